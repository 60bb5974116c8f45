"""``sdlm train RECIPE.yaml``: retrofit a causal LM into an SDLM.

The loop: load base -> add mask token -> attach the adapter (or unfreeze all)
-> for each step: draw samples, lay out blocks, pack, loss, step -> log,
evaluate, checkpoint. Everything random is seeded from (seed, step), so a run
killed and resumed from its last checkpoint ends exactly where an
uninterrupted run ends.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import math
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..adapter import AdapterConfig, attach
from ..attention import not_plain_attention, use_block_attention, use_gathered_attention
from ..cpu import native_bf16
from ..errors import SDLMError
from ..io import atomic_dir
from ..layout import sample_block_starts, training_layout
from ..model import SDLM, layer_list, use_flex_attention
from .data import Example, build_examples, read_records
from .fused import fuse_lora_linears, fuse_rms_norms, pack_frozen_linears, rope_fusion, shared_weights
from .loss import LossOutput, Packed, dense_loss, loss_norm, pack, two_pass_loss

logger = logging.getLogger(__name__)

RETROFITS = ("block-adapter", "lora", "full")
ATTENTIONS = ("auto", "sdpa", "blocks", "flex", "gather")
CLEAN_ATTENTIONS = ("auto", "chunks", "sdpa")
SDPA_BACKENDS = ("auto", "pytorch", "efficient", "cudnn", "flash", "math")
_SDPA_KERNELS = {"efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                 "flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}
CUDA_SDPA_ORDER = ("flash", "efficient", "cudnn", "math")
"""``sdpa_backend: auto`` on CUDA: the kernels in this order of preference. Flash runs the calls without a
mask; the step's masked calls run memory-efficient attention, which PyTorch's own order puts after cuDNN
and which made the eager step ×1.12 faster than cuDNN on an H200 (README)."""


@dataclass
class TrainConfig:
    """A training recipe. Every field can be set in the YAML file."""

    model: str = "smollm2-135m-instruct"
    """Base model: built-in name, local HF folder, random:<arch> or Hub id."""
    data: str | list[str] = ""
    """JSONL file (messages / conversations / text records; ``.jsonl.gz`` too) or a Hub dataset id;
    or a list of them, read one after another."""
    out_dir: str = "runs/sdlm"
    retrofit: str = "block-adapter"
    """block-adapter (gated LoRA, base output unchanged), lora (ungated) or full (all weights)."""
    block_size: int = 4
    lora_r: int = 32
    lora_alpha: float = 32.0
    lora_layers: list[int] | None = None
    """Decoder layers that get LoRA (None = all). With ``train_mask_embedding: false``, adapting
    only the top layers also cuts the backward pass to those layers."""
    lora_targets: list[str] | str = "all-linear"
    """Linear layers to adapt inside each decoder layer, e.g. [q_proj, v_proj] (default all)."""
    train_mask_embedding: bool = True
    init_adapter: str | None = None
    """Start from this adapter folder's weights (same LoRA settings), e.g. to continue a shipped model."""
    export_dtype: str = "float32"
    """dtype of the exported adapter weights (float32 or bfloat16: half the size)."""
    ar_loss_weight: float = 1.0
    """Joint next-token loss on clean response tokens (lora / full only; the gated adapter keeps the base)."""
    distill: float = 0.0
    """block-adapter only: weight of soft targets (the base model's own next-token distribution,
    from the clean pass) against the data's hard labels; 1.0 = soft targets only."""
    slot_weights: list[float] | None = None
    """One weight per block slot (length block_size): the block loss becomes the weighted mean over
    targets, e.g. [1, 0.8, 0.6, 0.4] to favour the early slots that every accepted prefix needs.
    None = every target counts the same."""
    lr: float = 5e-4
    weight_decay: float = 0.0
    schedule: str = "constant"
    """constant, linear or cosine (after warm-up)."""
    schedule_over: str = "steps"
    """``steps``: the schedule runs over ``steps``. ``time``: over whichever of ``steps`` and
    ``time_limit_minutes`` ends the run first, so a run sized by time still decays to zero at its end
    (for a fixed budget on a machine whose step time is not known in advance)."""
    warmup_steps: int = 20
    steps: int = 100
    samples_per_step: int = 8
    grad_accum: int = 1
    """Micro-batches per step; samples_per_step is split across them."""
    block_density: float = 1.0
    """Block tokens per response token: blocks per sample = ceil(density * targets / D)."""
    max_length: int = 512
    row_tokens: int | None = 1024
    """With ``attention: sdpa``/``flex``: pack several samples (clean + blocks) into rows of up to this many
    tokens (None: one per row). With ``attention: blocks`` or ``gather`` a micro-batch is one row whatever
    its length (its attention runs per sample or per chunk of one sample, so a row's length costs
    nothing, and one row has no padding and holds a shared prefix once)."""
    share_prefix: bool = True
    """A row of several samples that begin with the same clean tokens (a chat template's default system
    prompt: 24 tokens of every sample of the default corpus) holds them once, and every sample's tokens
    attend to that one copy (:func:`sdlm.train.loss.shared_prefix`): the same attention and losses (tested),
    over fewer clean tokens. Tokens that carry an AR label are never shared."""
    split_samples: bool = False
    """block-adapter only: run each sample of a micro-batch as a forward and backward of its own. The
    loss and gradients are the same (the step's mean over its targets). Off by default: the CPU
    default, ``attention: blocks``, runs a micro-batch as one row without padding and is faster."""
    heldout: int = 0
    """Samples kept out of training for evaluation."""
    eval_every: int = 0
    tpf_every: int = 0
    """Every this many steps (and at the end), the exact greedy speculative tokens per forward
    (SPEC §3.4) on the first ``tpf_samples`` held-out samples, taking their responses as the
    base model's greedy output (true for self-distilled data)."""
    tpf_samples: int = 16
    tpf_block_sizes: list[int] | None = None
    """Draft block sizes for the TPF report (default: [block_size])."""
    save_every: int = 50
    log_every: int = 1
    time_limit_minutes: float | None = None
    """Stop (checkpoint, export, report) once this much training time has been spent, counted over
    resumed runs too: runs of equal CPU time compare recipes fairly."""
    seed: int = 0
    bf16: bool | None = None
    """bf16 autocast; None = on where the device supports it."""
    bf16_weights: bool | None = None
    """With bf16 autocast: keep a bf16 copy of every frozen linear weight and use it inside autocast,
    instead of autocast casting the float32 weight at every call (it caches casts only of weights that
    train). The same numbers and fewer cast kernels; float32 weights stay for everything outside
    autocast. None = on for CPUs, where the casts cost step time; off on GPUs: on one H200 the step
    waits on the host, and the copies bought no speed there (README, "Trainer speed"). For
    retrofits that keep the base frozen."""
    bf16_base: bool | None = None
    """With bf16 autocast: run the frozen base model wholly in bf16 inside the training step (its
    weights, so also the residual stream, norms and rotary embeddings), instead of float32 activations
    around bf16 matrix products, with its RMS norms and, inside the step, its rotary embeddings fused
    (:func:`sdlm.train.fused.fuse_rms_norms`, :func:`sdlm.train.fused.rope_fusion`). The trainable weights
    (LoRA, the mask embedding), the optimizer and the loss stay float32; the held-out loss is computed as the step computes it, and everything else (held-out tokens per
    forward, the exported adapter) sees the float32 base, kept unchanged beside a bf16 copy of the
    frozen weights (2 more bytes per parameter). Not the same numbers as
    autocast's: activations are rounded to bf16 between layers (tested to be close; measured to learn
    the same per step, README). None = on for CPUs, where it removes most casts and halves the
    elementwise traffic (measured faster); off on GPUs, where a bf16 base bought no speed. Supersedes
    ``bf16_weights``. For retrofits that keep the base frozen."""
    packed_base: bool | None = None
    """With ``bf16_base`` on a CPU: give the frozen linear layers oneDNN-packed copies of their bf16
    weights, made once (:func:`sdlm.train.fused.pack_frozen_linears`; 4 more bytes per weight), and run
    on them the step's products that read those weights: the clean pass's, and the base products of the
    fused LoRA layers, forward and backward. The same products up to float rounding (another summation
    order; tested), without oneDNN laying the weight out again at every call. None = on where the CPU
    and the PyTorch build support it, except with ``compile: true`` (the compiler cannot lower oneDNN's
    packed products; setting both is an error)."""
    loss_chunk: int | None = None
    """block-adapter, hard labels: apply the LM head and the loss to this many block targets at a time
    (they run together, the gradient taken in the same pass: :func:`sdlm.train.loss.linear_ce`), so at
    most this many rows of logits are in memory. The same loss and gradients at every size (tested).
    None: 1024. Not with ``distill`` (soft targets need all of a step's logits)."""
    fused_lora: bool | None = None
    """block-adapter: run the block pass's LoRA layers as one autograd function each
    (:mod:`sdlm.train.fused`): the input cast once, the low-rank update accumulated by the matrix
    product, a backward pass of five matrix products; the same loss and gradients as ``peft``'s layers
    up to rounding (tested). ``false``: ``peft``'s own forward. None = on for CPUs, where it is
    measured faster; off on GPUs, where it measured slower (an H200, README)."""
    attention: str = "auto"
    """``sdpa``: dense (T x T) masks from the block rule. ``blocks`` (block-adapter): a micro-batch
    runs as one row, its samples one after another with no padding (so every linear layer runs once
    on all of them); the clean pass is causal within each sample, and each sample's block pass
    computes its attention in two exact pieces, over its clean keys and within each block
    (:mod:`sdlm.attention`), skipping the scores the rule hides between blocks and between samples.
    Other forwards run sdpa. ``flex``: flex attention from the same rule
    (:func:`sdlm.masks.block_mask`), which skips the tiles the rule hides (most of the block part)
    and builds no dense mask; CUDA only: PyTorch has no CPU backward for flex attention. ``gather``
    (block-adapter): a micro-batch runs as one row without padding, as with ``blocks``, and each pass's
    queries run in chunks of ``gather_chunk`` consecutive queries of one sample, each over exactly the
    keys some query of it may see, in a few batched sdpa calls (:mod:`sdlm.gathered`): the other samples
    and most of the masked scores are never computed, with no host call per sample. ``auto``:
    ``blocks`` for the block-adapter on CPU, else ``sdpa`` (on GPUs large padded rows keep the
    device busy, while per-sample attention would add host calls); ``sdpa`` also for a model with
    sliding-window or chunked layers whose window is shorter than ``max_length + block_size``, since
    only the dense masks apply windows (``blocks``, ``flex`` and ``gather`` refuse such a batch)."""
    gather_chunk: int = 64
    """With ``attention: gather``: queries per chunk (16 blocks of 4, or 64 clean tokens). Larger chunks
    make fewer, larger calls; smaller ones compute fewer masked scores."""
    sdpa_backend: str = "auto"
    """The kernel the step's sdpa calls run (``attention: sdpa``, and the sdpa calls of the others), in
    the training step and the held-out loss, through :func:`torch.nn.attention.sdpa_kernel`. ``auto``:
    on CUDA the order of preference :data:`CUDA_SDPA_ORDER` (memory-efficient attention before cuDNN for
    the masked calls), elsewhere PyTorch's choice. ``pytorch``: PyTorch's own choice everywhere.
    ``efficient`` (memory-efficient attention, CUDA), ``cudnn`` (CUDA), ``flash`` (no attention masks:
    only for rows of one sample's clean tokens) or ``math``: that kernel alone; a step it cannot run
    fails with PyTorch's error. Held-out tokens per forward and decoding are left to PyTorch's choice."""
    clean_attention: str = "auto"
    """With ``attention: blocks``: how the clean pass's causal attention runs (no gradients). ``chunks``: 128
    queries at a time as plain products; ``sdpa``: PyTorch's fused kernel, one call per sample; ``auto``:
    the one measured faster for the device and dtype it runs in (:func:`sdlm.attention.clean_pass_kernel`:
    ``chunks`` for bf16 on CPUs without AMX, ``sdpa`` elsewhere). Both give the same attention up to
    rounding."""
    compile: bool = False
    """``torch.compile`` the parts of every decoder layer that repeat (the MLP, the norms, the
    attention's projections with their LoRA): fused kernels and fewer host calls per step. The
    attention itself stays eager (its KV-cache update depends on the layer index, which would compile
    one graph per layer). The first steps are slower while it compiles; the same loss as without it
    up to float rounding (tested). Needs a C++ compiler on CPU, Triton on GPU."""
    fsdp: bool = False
    """``retrofit: full`` under a launcher (several processes): shard the model's weights, gradients and
    optimizer state over the processes with PyTorch's FSDP (``fully_shard`` on every decoder layer and
    on the whole model), so each process holds 1/W of them instead of a full copy. The same steps as
    plain data parallel (gradients summed over the processes, tested against one process). Checkpoints
    and the final model are written whole, by process 0. A single process ignores it."""
    prep_workers: int | None = None
    """Processes that lay out and pack the next steps' micro-batches while the current one runs (a
    :class:`torch.utils.data.DataLoader` over steps): the same batches as laid out in the training process
    (tested), off its critical path. 0: in the training process, in series with the step. None: 1 on
    GPUs, where the host's layout held up the device (README); 0 on CPUs, where it is under 1% of a step
    and a worker process would take a core from the step."""
    device: str = "cpu"
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.retrofit not in RETROFITS:
            raise SDLMError(f"unknown retrofit {self.retrofit!r}: use one of {', '.join(RETROFITS)}")
        if self.block_size < 1:
            raise SDLMError(f"block_size must be >= 1, got {self.block_size}")
        if self.loss_chunk is not None:
            if not isinstance(self.loss_chunk, int) or self.loss_chunk < 1:
                raise SDLMError(f"loss_chunk must be a number of targets >= 1 (or null), got {self.loss_chunk!r}")
            if self.retrofit != "block-adapter" or self.distill > 0:
                raise SDLMError("loss_chunk is for retrofit: block-adapter with hard labels (distill: 0)")
        if self.attention not in ATTENTIONS:
            raise SDLMError(f"unknown attention {self.attention!r}: use one of {', '.join(ATTENTIONS)}")
        if self.sdpa_backend not in SDPA_BACKENDS:
            raise SDLMError(f"unknown sdpa_backend {self.sdpa_backend!r}: use one of {', '.join(SDPA_BACKENDS)}")
        if self.sdpa_backend in ("efficient", "cudnn") and not self.device.startswith("cuda"):
            raise SDLMError(f"sdpa_backend: {self.sdpa_backend} runs on CUDA only: use auto, flash or math on "
                            f"device {self.device}")
        if self.attention in ("blocks", "gather") and self.retrofit != "block-adapter":
            raise SDLMError(f"attention: {self.attention} is for retrofit: block-adapter (its block pass runs apart "
                            "from the clean tokens): use attention: sdpa")
        if self.clean_attention not in CLEAN_ATTENTIONS:
            raise SDLMError(f"unknown clean_attention {self.clean_attention!r}: use one of "
                            f"{', '.join(CLEAN_ATTENTIONS)}")
        if not isinstance(self.gather_chunk, int) or self.gather_chunk < 1:
            raise SDLMError(f"gather_chunk must be a number of queries >= 1, got {self.gather_chunk!r}")
        if self.schedule not in ("constant", "linear", "cosine"):
            raise SDLMError(f"unknown schedule {self.schedule!r}: use constant, linear or cosine")
        if self.schedule_over not in ("steps", "time"):
            raise SDLMError(f"unknown schedule_over {self.schedule_over!r}: use steps or time")
        if self.schedule_over == "time" and not self.time_limit_minutes:
            raise SDLMError("schedule_over: time needs time_limit_minutes")
        if self.samples_per_step < self.grad_accum:
            raise SDLMError("samples_per_step must be >= grad_accum (each micro-batch needs a sample)")
        if not 0.0 <= self.distill <= 1.0:
            raise SDLMError(f"distill must be between 0 and 1, got {self.distill}")
        if self.distill > 0 and self.retrofit != "block-adapter":
            raise SDLMError("distill (soft targets from the frozen base) needs retrofit: block-adapter")
        if self.slot_weights is not None:
            w = self.slot_weights
            if not isinstance(w, list) or len(w) != self.block_size or not all(isinstance(x, (int, float)) for x in w):
                raise SDLMError(f"slot_weights must be a list of block_size={self.block_size} numbers, got {w!r}")
            if any(x < 0 for x in w) or not any(x > 0 for x in w):
                raise SDLMError(f"slot_weights must be >= 0 with at least one > 0, got {w}")
        if self.fsdp and self.retrofit != "full":
            raise SDLMError(f"fsdp shards the weights of retrofit: full; retrofit: {self.retrofit} trains a small "
                            "adapter and runs data parallel without it: set fsdp: false")
        if self.prep_workers is not None and (not isinstance(self.prep_workers, int) or self.prep_workers < 0):
            raise SDLMError(f"prep_workers must be a number of processes >= 0 (or null), got {self.prep_workers!r}")
        if self.fsdp and self.compile:
            raise SDLMError("fsdp with compile: true is not supported: set one of them to false")
        if self.packed_base and self.compile:
            raise SDLMError("packed_base with compile: true is not supported (torch.compile cannot lower oneDNN's "
                            "packed products): set packed_base: false, or leave it unset with compile: true")
        if not self.data:
            raise SDLMError("the recipe names no data: set `data:` to a JSONL file")
        if isinstance(self.data, list) and not all(isinstance(d, str) and d for d in self.data):
            raise SDLMError("`data:` must be a path or a list of paths")

    @property
    def data_sources(self) -> list[str]:
        """``data`` as a list: one path, or several read one after another."""
        return list(self.data) if isinstance(self.data, list) else [self.data]

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: dict | None = None) -> "TrainConfig":
        import yaml

        p = Path(path)
        if not p.is_file():
            raise SDLMError(f"recipe {path} not found: give a YAML file (see recipes/)")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise SDLMError(f"recipe {path} is not valid YAML: {e}") from None
        raw.update(overrides or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise SDLMError(f"recipe {path}: unknown keys {unknown}; known keys: {sorted(known)}")
        # a relative data path is read relative to the recipe when it exists there
        def _resolve(d):
            if isinstance(d, str) and d and not Path(d).exists() and (p.parent / d).exists():
                return str(p.parent / d)
            return d

        data = raw.get("data", "")
        raw["data"] = [_resolve(d) for d in data] if isinstance(data, list) else _resolve(data)
        return cls(**{k: _coerce(cls, k, v) for k, v in raw.items()})


def _coerce(cls, key: str, value):
    """YAML reads ``1e-3`` as a string (YAML 1.1 wants ``1.0e-3``): coerce numbers by field type."""
    kind = {f.name: f.type for f in fields(cls)}[key]
    if isinstance(value, str) and kind in ("float", "int", "float | None", "int | None"):
        try:
            return float(value) if kind.startswith("float") else int(value)
        except ValueError:
            raise SDLMError(f"recipe key {key!r} must be a number, got {value!r}") from None
    if kind in ("bool", "bool | None") and not isinstance(value, bool) and not (value is None and "None" in kind):
        allowed = "true or false" + (" (or null: the default)" if "None" in kind else "")
        raise SDLMError(f"recipe key {key!r} must be {allowed}, got {value!r}")
    return value


def lr_factor(cfg: TrainConfig, step: int, seconds: float = 0.0) -> float:
    """The learning-rate multiplier at ``step``, after ``seconds`` of training time."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    if cfg.schedule_over == "time":
        frac = max(frac, seconds / (60 * cfg.time_limit_minutes))
    if cfg.schedule == "linear":
        return max(0.0, 1.0 - frac)
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
    return 1.0


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.dist = Dist.from_env(cfg.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        elif self.dist.world > 1 and cfg.device == "cpu":  # processes share the cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.dist.local_world))
        if self.dist.world > 1 and cfg.device.startswith("cuda"):
            cfg.device = f"cuda:{self.dist.local_rank}"
        torch.manual_seed(cfg.seed)
        self.out = Path(cfg.out_dir)
        self.ckpt = self.out / "checkpoint"
        self.sdlm = SDLM.load(cfg.model, dtype=torch.float32, device=cfg.device, quiet=True, prepack=False)
        self.sdlm.retrofit(block_size=cfg.block_size, ar_loss_weight=cfg.ar_loss_weight)
        self.sdlm.config.retrofit = cfg.retrofit
        self.adapter = None
        self.notes: list[str] = []  # shown when the run starts
        self.fsdp = bool(cfg.fsdp and self.dist.world > 1)
        if cfg.retrofit == "full":
            for p in self.sdlm.model.parameters():
                p.requires_grad_(True)
            if self.fsdp:  # replaces each parameter by its shard: collect them after
                units = fully_shard_model(self.sdlm.model, self.dist, self.sdlm.device)
            params = [p for p in self.sdlm.model.parameters()]
            if self.fsdp:
                held = sum(getattr(p, "to_local", lambda p=p: p)().numel() for p in params) / max(1, sum(p.numel() for p in params))
                self.notes.append(f"fsdp: the model is sharded over {self.dist.world} processes in {units} units; "
                                  f"process {self.dist.rank} holds {held:.1%} of its weights")
        else:
            acfg = AdapterConfig(kind=cfg.retrofit, r=cfg.lora_r, alpha=cfg.lora_alpha, layers=cfg.lora_layers,
                                 target_modules=cfg.lora_targets, base_model=cfg.model)
            self.adapter = attach(self.sdlm, acfg)
            params = list(self.adapter.lora_parameters().values())
            if cfg.init_adapter:
                self._init_adapter(cfg.init_adapter)
            if cfg.train_mask_embedding:
                self.adapter.train_mask_embedding()
                params.append(self.adapter.mask_embedding)
        self.params = params
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=_fused_adamw(params))
        self.bf16 = cfg.bf16 if cfg.bf16 is not None else _bf16_supported(cfg.device)
        on_cpu = self.sdlm.device.type == "cpu"  # the default of the settings measured on CPUs only
        if on_cpu and cfg.bf16 is not False and not _bf16_supported("cpu"):
            if cfg.bf16:
                logger.warning("bf16: true on a CPU without native bf16 instructions (avx512_bf16 or amx_bf16): its "
                               "bf16 products are emulated, several times slower than float32 (bf16: false is "
                               "faster here)")
            else:
                logger.warning("this CPU has no native bf16 instructions (avx512_bf16 or amx_bf16): the step runs in "
                               "float32, slower than with bf16 autocast on a CPU that has them (bf16: false in the "
                               "recipe, or --set bf16=false, says so and silences this)")
        want = cfg.bf16_base if cfg.bf16_base is not None else on_cpu
        self.bf16_base = bool(self.bf16 and want and cfg.retrofit != "full")
        self._base16 = FrozenBF16(self.sdlm.model) if self.bf16_base else None
        self._rope = None
        if self.bf16_base:
            fuse_rms_norms(self.sdlm.model)  # fewer passes for its bf16 norms
            self._rope = rope_fusion(self.sdlm.model)  # and for its rotary embeddings, inside the step
        want = cfg.packed_base if cfg.packed_base is not None else on_cpu and not cfg.compile
        self.packed_base = bool(self.bf16_base and want and on_cpu
                                and pack_frozen_linears(self.sdlm.model, self._base16.low_of))
        want = cfg.bf16_weights if cfg.bf16_weights is not None else on_cpu
        self.bf16_weights = bool(self.bf16 and want and cfg.retrofit != "full" and not self.bf16_base)
        if self.bf16_weights:
            shadow_bf16_linears(self.sdlm.model)
        fused = cfg.fused_lora if cfg.fused_lora is not None else on_cpu
        self.fused_lora = bool(fused and cfg.retrofit == "block-adapter")
        if self.fused_lora:
            fuse_lora_linears(self.sdlm)
        if self.attention == "flex":
            if self.sdlm.device.type != "cuda":
                raise SDLMError("attention: flex trains on CUDA only (PyTorch has no CPU backward for flex "
                                "attention): use attention: sdpa on this device")
            use_flex_attention(self.sdlm.model)
        elif self.attention == "blocks":
            use_block_attention(self.sdlm.model)
        elif self.attention == "gather":
            use_gathered_attention(self.sdlm.model)
        if cfg.compile:
            compile_regions(self.sdlm.model)

        eos = self.sdlm.eos_token_ids()
        records = [r for src in cfg.data_sources for r in read_records(src)]
        rng = random.Random(cfg.seed)
        rng.shuffle(records)
        examples, self.data_stats = build_examples(records, self.sdlm.tokenizer, eos, cfg.max_length)
        if len(examples) <= cfg.heldout:
            raise SDLMError(f"{cfg.data}: {len(examples)} usable samples, not more than heldout={cfg.heldout}")
        self.heldout: list[Example] = examples[: cfg.heldout]
        self.train: list[Example] = examples[cfg.heldout :]
        self.prep = StepPrep(cfg, self.train, self.sdlm.config.mask_token_id,
                             one_row=self.attention in ("blocks", "gather"),
                             split=self.split_samples, rank=self.dist.rank, world=self.dist.world)
        on_gpu = self.sdlm.device.type == "cuda"
        self.prep_workers = cfg.prep_workers if cfg.prep_workers is not None else int(on_gpu)
        self._loader, self._loader_next = None, None
        self.step = 0
        self.block_tokens = 0  # trained block targets so far
        self.train_seconds = 0.0
        self.prep_seconds = 0.0  # host time spent laying out and packing the current step (or waiting for it)

    # ------------------------------------------------------------ data for one step

    def _step_work(self) -> "StepWork":
        """The host work of the current step: from a prep worker where there is one, else done here."""
        cfg = self.cfg
        if not self.prep_workers:
            return self.prep.step_work(self.step, cfg.samples_per_step)
        key = (self.step, cfg.samples_per_step)
        if self._loader is None or self._loader_next != key:  # first step, resumed, or the step size changed
            self._loader = None  # shuts the old workers down
            stream = _StepStream(self.prep, self.step, cfg.samples_per_step)
            self._loader = iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=self.prep_workers,
                                                            prefetch_factor=2))
        step, work = next(self._loader)
        if step != self.step:  # the stream runs step by step from where it started
            raise SDLMError(f"internal error: prep worker sent step {step} for step {self.step}")
        self._loader_next = (self.step + 1, cfg.samples_per_step)
        return work

    @property
    def attention(self) -> str:
        """The attention the step runs (``auto`` resolved)."""
        if self.cfg.attention != "auto":
            return self.cfg.attention
        reach = self.sdlm.windows.smallest  # a sliding window or chunk only the dense masks apply
        if reach is not None and self.cfg.max_length + self.cfg.block_size > reach:
            return "sdpa"
        if not_plain_attention(self.sdlm.model) is not None:  # soft-capping, sinks: the model's own attention
            return "sdpa"
        return "blocks" if self.cfg.retrofit == "block-adapter" and self.sdlm.device.type == "cpu" else "sdpa"

    @property
    def split_samples(self) -> bool:
        if self.cfg.retrofit != "block-adapter":
            return False
        return self.cfg.split_samples

    def loss(self, examples: list[Example], generator: torch.Generator, backward_scale: float | None = None) -> LossOutput:
        """The loss of one micro-batch; with ``backward_scale``, also the backward pass of
        ``backward_scale`` x loss (then the returned loss is detached)."""
        t0 = time.perf_counter()
        batches, norm = self.prep.prepare(examples, generator)
        self.prep_seconds += time.perf_counter() - t0
        return self._micro_loss(batches, norm, backward_scale)

    def _micro_loss(self, batches: list[Packed], norm: float | None, backward_scale: float | None) -> LossOutput:
        """The loss (and with ``backward_scale`` the backward pass) of one micro-batch's packed batches."""
        cfg = self.cfg
        outs = []
        kernels = sdpa_context(cfg.sdpa_backend, self.sdlm.device.type)
        rope = self._rope() if self._rope else contextlib.nullcontext()
        with self._base16 or contextlib.nullcontext(), kernels, rope:  # around the backward too: it reads the weights
            for batch in batches:
                with torch.autocast(self.sdlm.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    if cfg.retrofit == "block-adapter":
                        out = two_pass_loss(self.sdlm, batch, cfg.block_size, cfg.distill, cfg.slot_weights, norm,
                                            chunk=cfg.loss_chunk, gather_chunk=cfg.gather_chunk,
                                            clean_attention=cfg.clean_attention)
                    else:
                        out = dense_loss(self.sdlm, batch, cfg.block_size, cfg.ar_loss_weight, cfg.slot_weights)
                if backward_scale is not None:
                    (out.loss * backward_scale).backward()
                    out.loss = out.loss.detach()
                outs.append(out)
        return _combine(outs)

    # ------------------------------------------------------------ the loop

    def run(self, progress: bool = True) -> dict:
        """Train up to ``steps`` (from the checkpoint in ``out_dir`` if there is one), evaluating and
        checkpointing as the recipe says, then export. Returns the last step's record with ``final`` (the
        exported folder) and, over the steps this call ran, ``steps_run`` and the medians
        ``median_block_tokens_per_s`` and ``median_sample_tokens_per_s``."""
        from tqdm import tqdm

        cfg, dist = self.cfg, self.dist
        main = dist.rank == 0
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        self._resume()
        metrics_path = self.out / "metrics.jsonl"
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (progress and main), desc="train", dynamic_ncols=True)
        last = {}
        for note in self.notes if main else ():
            bar.write(note)
        if cfg.compile and main and self.step < cfg.steps:
            bar.write("compile: true: the first steps compile the decoder layers' repeated parts and run slower")
        rates: list[tuple[float, float]] = []  # (trained block tokens/s, sample tokens/s) of the steps run here
        while self.step < cfg.steps:
            over_time = cfg.time_limit_minutes is not None and self.train_seconds >= 60 * cfg.time_limit_minutes
            if dist.any(over_time):
                bar.write(f"time limit of {cfg.time_limit_minutes} min reached at step {self.step}") if main else None
                cfg.steps = self.step
                self.save_checkpoint()
                if cfg.tpf_every and self.heldout and (main or self.fsdp):  # FSDP: every process runs the forwards
                    ev = self.evaluate_tpf()
                    if main:
                        _append_jsonl(metrics_path, ev)
                dist.barrier()
                break
            last = self.train_step()
            rates.append((last["block_tokens_per_s"], last["sample_tokens_per_s"]))
            bar.update(1)
            bar.set_postfix_str(
                f"loss {last['loss']:.3f} acc {'/'.join(f'{a:.2f}' for a in last['slot_acc'][:4])} "
                f"{last['block_tokens_per_s']:.0f} blk tok/s (median {statistics.median(r for r, _ in rates):.0f})"
            )
            if main and cfg.log_every and self.step % cfg.log_every == 0:
                _append_jsonl(metrics_path, last)
            evaluates = main or self.fsdp  # a sharded model's forwards need every process
            if evaluates and cfg.eval_every and self.heldout and self.step % cfg.eval_every == 0:
                ev = self.evaluate()
                if main:
                    _append_jsonl(metrics_path, ev)
                    logger.info("eval step %d: %s", self.step, ev)
            if evaluates and cfg.tpf_every and self.heldout and (self.step % cfg.tpf_every == 0 or self.step == cfg.steps):
                ev = self.evaluate_tpf()
                if main:
                    _append_jsonl(metrics_path, ev)
                    bar.write(f"step {self.step}: held-out tokens/forward " + ", ".join(
                        f"D={d}: {v:.3f}" for d, v in ev["tpf"].items()))
            if (cfg.save_every and self.step % cfg.save_every == 0) or self.step == cfg.steps:
                self.save_checkpoint()
        bar.close()
        self._loader = None  # stops the prep workers
        final = self.export()
        if main:
            _plot(metrics_path, self.out / "metrics.png")
        dist.barrier()
        speed = {"bf16": self.bf16}  # what the speed figures below were measured with
        if rates:  # the run's speed: the median over the steps it ran (one step's figure wanders by +-10%)
            speed |= {"steps_run": len(rates),
                      "median_block_tokens_per_s": round(statistics.median(r for r, _ in rates), 1),
                      "median_sample_tokens_per_s": round(statistics.median(r for _, r in rates), 1)}
        return {"final": str(final), **last, **speed}

    def train_step(self) -> dict:
        """One optimiser step (all micro-batches of every process); returns its metrics record."""
        cfg, dist = self.cfg, self.dist
        # micro-batches per step, over all processes: process r runs micro-batches r, r+W, r+2W, ...
        n_micro = cfg.grad_accum * dist.world
        t0 = time.perf_counter()
        for g in self.opt.param_groups:
            g["lr"] = cfg.lr * lr_factor(cfg, self.step, self.train_seconds)
        if cfg.samples_per_step < n_micro:
            raise SDLMError(f"samples_per_step={cfg.samples_per_step} is less than grad_accum x processes = {n_micro}")
        work = self._step_work()
        self.prep_seconds = time.perf_counter() - t0  # laying out here, or waiting for a prep worker
        self.opt.zero_grad(set_to_none=True)
        agg = None
        # each micro-batch's term is loss / n_micro, summed over every process's micro-batches; FSDP averages
        # the gradients over the processes instead of summing them, so its terms are W times larger
        scale = (dist.world if self.fsdp else 1) / n_micro
        try:
            for batches, norm_m in work.micro:
                agg = _accumulate(agg, self._micro_loss(batches, norm_m, backward_scale=scale))
        except torch.OutOfMemoryError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else "out of memory"
            raise SDLMError(
                f"out of device memory in a step of {cfg.samples_per_step} samples in {cfg.grad_accum} micro-batch(es) "
                f"({first}): raise grad_accum (the same step in smaller parts) or lower samples_per_step"
                + ("; attention: gather or flex keeps no dense masks" if self.attention == "sdpa" else "")) from None
        if not self.fsdp:  # FSDP reduces (and shards) the gradients in the backward pass
            dist.all_reduce_grads(self.params)
        agg = dist.all_reduce_metrics(agg)
        norm = torch.nn.utils.clip_grad_norm_(self.params, 1.0)  # before clipping
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # sharded: a DTensor
        self.opt.step()
        if self.sdlm.device.type == "cuda":
            torch.cuda.synchronize(self.sdlm.device)
        dt = dist.max(time.perf_counter() - t0)
        self.train_seconds += dt
        self.block_tokens += agg["n_block_targets"]
        self.step += 1
        rec = self._record(agg, dt, n_micro, sample_tokens=work.sample_tokens)
        rec["grad_norm"] = round(norm, 6)
        return rec

    def _record(self, agg: dict, dt: float, n_micro: int = 1, sample_tokens: int = 0) -> dict:
        acc = (agg["slot_correct"] / agg["slot_count"].clamp_min(1)).tolist()
        sl = (agg["slot_loss_sum"] / agg["slot_count"].clamp_min(1)).tolist()
        return {
            "step": self.step,
            "loss": agg["loss"] / n_micro,
            "slot_loss": [round(x, 4) for x in sl],
            "slot_acc": [round(x, 4) for x in acc],
            "block_tokens": agg["n_block_targets"],
            "block_tokens_per_s": agg["n_block_targets"] / dt,
            "sample_tokens_per_s": sample_tokens / dt,
            "prep_seconds": round(self.prep_seconds, 4),
            "step_seconds": round(dt, 4),
            "processes": self.dist.world,
            "lr": self.opt.param_groups[0]["lr"],
            "seconds": round(self.train_seconds, 2),
        }

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out loss and per-slot accuracy (blocks at every position of the loss span)."""
        gen = torch.Generator().manual_seed(12345)
        agg = None
        for i in range(0, len(self.heldout), 4):
            agg = _accumulate(agg, self.loss(self.heldout[i : i + 4], gen))
        acc = (agg["slot_correct"] / agg["slot_count"].clamp_min(1)).tolist()
        return {"step": self.step, "eval_slot_acc": [round(x, 4) for x in acc],
                "eval_block_loss": float(agg["slot_loss_sum"].sum() / agg["slot_count"].sum())}

    @torch.no_grad()
    def evaluate_tpf(self) -> dict:
        """Exact greedy speculative tokens per forward on held-out samples (SPEC §3.4)."""
        from ..tpf import summarize, tokens_per_forward

        if self.adapter is not None:
            self.adapter.write_mask_embedding()  # inference reads the mask row of the embedding
        t0 = time.perf_counter()
        out, hist = {}, {}
        for D in self.cfg.tpf_block_sizes or [self.cfg.block_size]:
            res = []
            for ex in self.heldout[: self.cfg.tpf_samples]:
                span = torch.nonzero(ex.loss_mask).flatten()
                if len(span) == 0:
                    continue
                a, b = int(span[0]), int(span[-1]) + 1
                res.append(tokens_per_forward(self.sdlm, ex.ids[:a].tolist(), ex.ids[a:b].tolist(), D))
            summary = summarize(res)
            out[D], hist[D] = round(summary["tokens_per_forward"], 4), summary["prompts"]
        return {"step": self.step, "tpf": out, "tpf_prompts": hist, "tpf_seconds": round(time.perf_counter() - t0, 1),
                "train_seconds": round(self.train_seconds, 1), "block_tokens_total": self.block_tokens}

    # ------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> None:
        """Trainable state, optimizer and counters, written to a temp folder then renamed (process 0).
        With ``fsdp`` every process first takes part in gathering the whole model and optimizer state."""
        whole = self._gather() if self.fsdp else None
        if self.dist.rank != 0:
            self.dist.barrier()
            return
        with atomic_dir(self.ckpt) as tmp:
            if self.adapter is not None:
                self.adapter.save(tmp / "adapter")
            else:
                self.sdlm.save(tmp / "model", state_dict=whole[0] if whole else None)
            torch.save(whole[1] if whole else self.opt.state_dict(), tmp / "optimizer.pt")
            state = {"step": self.step, "block_tokens": self.block_tokens, "train_seconds": self.train_seconds,
                     "fsdp": self.fsdp, "config": asdict(self.cfg)}
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
        self.dist.barrier()

    def _resume(self) -> None:
        state_file = self.ckpt / "trainer_state.json"
        if not state_file.is_file():
            return
        try:
            state = json.loads(state_file.read_text())
        except ValueError as e:
            raise SDLMError(f"cannot resume from {self.ckpt}: {state_file.name} is not valid JSON ({e}); delete "
                            "the checkpoint to start over") from None
        if bool(state.get("fsdp", False)) != self.fsdp:
            how = "with fsdp: true under a launcher (several processes)" if state.get("fsdp") else \
                "without fsdp (fsdp: false, or a single process)"
            raise SDLMError(f"the checkpoint in {self.ckpt} was written by a run {how}, whose optimizer state is "
                            "stored another way: resume it the same way, or delete it to start over")
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        try:
            if self.adapter is not None:
                from safetensors.torch import load_file

                self.adapter.load_state_dict(load_file(str(self.ckpt / "adapter" / "adapter.safetensors")))
            else:
                from safetensors.torch import load_file as lf

                sd = {}
                for f in sorted((self.ckpt / "model").glob("*.safetensors")):
                    sd.update(lf(str(f)))
                if self.fsdp:  # every process reads the whole state and keeps its shard
                    set_model_state_dict(self.sdlm.model, sd, options=StateDictOptions(full_state_dict=True, strict=False))
                else:
                    self.sdlm.model.load_state_dict(sd, strict=False)
            osd = torch.load(self.ckpt / "optimizer.pt", weights_only=True)
            if self.fsdp:
                set_optimizer_state_dict(self.sdlm.model, self.opt, osd, options=StateDictOptions(full_state_dict=True))
            else:
                self.opt.load_state_dict(osd)
        except SDLMError:
            raise
        except Exception as e:  # noqa: BLE001
            raise SDLMError(f"cannot resume from {self.ckpt}: {type(e).__name__}: {e}; delete it to start over") from None
        self.step, self.block_tokens = state["step"], state["block_tokens"]
        self.train_seconds = state.get("train_seconds", 0.0)
        if self.dist.rank == 0:  # said by default: a run that goes on from where it was is not a fresh one
            logger.warning("resuming from the checkpoint in %s at step %d of %d (to start over, delete it or give "
                           "another out_dir)", self.ckpt, self.step, self.cfg.steps)

    def _init_adapter(self, folder: str) -> None:
        from safetensors.torch import load_file

        from ..adapter import ADAPTER_WEIGHTS, is_adapter_folder

        if not is_adapter_folder(folder):
            raise SDLMError(f"init_adapter {folder} is not an adapter folder (no sdlm_adapter.json)")
        self.adapter.load_state_dict(load_file(str(Path(folder) / ADAPTER_WEIGHTS)))
        logger.info("adapter weights initialised from %s", folder)

    def _gather(self) -> tuple[dict, dict]:
        """The whole model and optimizer state of a sharded (FSDP) model, on the host of process 0 (the
        other processes get empty dicts). Every process must call it: it gathers the shards."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return (get_model_state_dict(self.sdlm.model, options=opts),
                get_optimizer_state_dict(self.sdlm.model, self.opt, options=opts))

    def export(self) -> Path:
        """The final artifact: ``out_dir/final`` (adapter folder, or a full HF folder), written by process 0;
        every process calls it (with ``fsdp`` they gather the model for it)."""
        final = self.out / "final"
        whole = self._gather()[0] if self.fsdp else None
        if self.dist.rank != 0:
            return final
        if self.adapter is not None:
            if self.cfg.export_dtype not in ("float32", "bfloat16", "float16"):
                raise SDLMError(f"export_dtype {self.cfg.export_dtype!r}: use float32, bfloat16 or float16")
            return self.adapter.save(final, dtype=getattr(torch, self.cfg.export_dtype))
        return self.sdlm.save(final, state_dict=whole)


@functools.cache
def _sdpa_orders() -> bool:
    """Whether this PyTorch's ``sdpa_kernel`` takes an order of preference (``set_priority``)."""
    return "set_priority" in inspect.signature(sdpa_kernel).parameters


def sdpa_context(choice: str, device_type: str):
    """The context that sets sdpa's kernels for ``sdpa_backend: choice`` on a device of ``device_type``
    (see :attr:`TrainConfig.sdpa_backend`). ``auto`` on CUDA needs ``sdpa_kernel``'s ``set_priority``;
    with a PyTorch that lacks it, it leaves the choice to PyTorch."""
    if choice == "auto" and device_type == "cuda" and _sdpa_orders():
        return sdpa_kernel([_SDPA_KERNELS[k] for k in CUDA_SDPA_ORDER], set_priority=True)
    if choice in ("auto", "pytorch"):
        return contextlib.nullcontext()
    return sdpa_kernel(_SDPA_KERNELS[choice])


@dataclass
class StepWork:
    """A step's host work for this process: per micro-batch, its packed batches and loss norm."""

    micro: list[tuple[list[Packed], float | None]]
    sample_tokens: int
    """Tokens of the step's samples over every process (the trainer's sample tokens/s)."""


class StepPrep:
    """Which samples a step trains on, their block layouts and packed batches: the host work of a step,
    with no model and no device, so that a prep worker process can do it ahead of the step."""

    def __init__(self, cfg: TrainConfig, train: list[Example], mask_token_id: int, one_row: bool, split: bool,
                 rank: int = 0, world: int = 1):
        self.cfg, self.train, self.mask_token_id = cfg, train, mask_token_id
        self.one_row, self.split, self.rank, self.world = one_row, split, rank, world
        self._order: tuple[int | None, torch.Tensor | None] = (None, None)  # (epoch, its sample order)

    def samples(self, step: int, samples_per_step: int) -> list[Example]:
        """The samples of ``step``: a seeded permutation per epoch, consumed in order."""
        n, k = len(self.train), samples_per_step
        out = []
        for i in range(step * k, step * k + k):
            epoch, j = divmod(i, n)
            out.append(self.train[int(self._epoch_order(epoch)[j])])
        return out

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        """The seeded order of the training samples in ``epoch`` (kept for the current epoch)."""
        if self._order[0] != epoch:
            gen = torch.Generator().manual_seed(self.cfg.seed * 1000003 + epoch)
            self._order = (epoch, torch.randperm(len(self.train), generator=gen))
        return self._order[1]

    def prepare(self, examples: list[Example], generator: torch.Generator) -> tuple[list[Packed], float | None]:
        """One micro-batch's packed batches (one, or one per sample with ``split_samples``) and its loss norm."""
        cfg, D = self.cfg, self.cfg.block_size
        layouts = []
        for ex in examples:
            n_blocks = max(1, math.ceil(cfg.block_density * ex.n_targets / D))
            starts = sample_block_starts(ex.loss_mask, n_blocks, generator)  # drawn afresh every epoch
            layouts.append(training_layout(ex.ids, ex.loss_mask, starts, D, self.mask_token_id))
        parts = [[lay] for lay in layouts] if self.split else [layouts]
        norm = loss_norm(layouts, cfg.slot_weights) if len(parts) > 1 else None
        # attention: blocks and gather: one row per part, since each sample's attention runs apart anyway
        batches = [pack(p, row_tokens=sum(lay.input_ids.shape[0] for lay in p) if self.one_row else cfg.row_tokens,
                        share_prefix=cfg.share_prefix) for p in parts]
        return batches, norm

    def step_work(self, step: int, samples_per_step: int) -> StepWork:
        """This process's micro-batches of ``step`` (r, r+W, ... of grad_accum x W), seeded by step and index."""
        n_micro = self.cfg.grad_accum * self.world
        samples = self.samples(step, samples_per_step)
        micro = []
        for m in range(self.rank, n_micro, self.world):
            gen = torch.Generator().manual_seed((self.cfg.seed * 7919 + step) * 1009 + m)
            micro.append(self.prepare(samples[m::n_micro], gen))
        return StepWork(micro, sum(int(ex.ids.shape[0]) for ex in samples))


class _StepStream(torch.utils.data.IterableDataset):
    """``(step, StepWork)`` for every step from ``start`` on; with several workers, worker w of W lays out
    steps start + w, start + w + W, ..., and the loader hands them back in step order."""

    def __init__(self, prep: StepPrep, start: int, samples_per_step: int):
        self.prep, self.start, self.samples_per_step = prep, start, samples_per_step

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, W = (info.id, info.num_workers) if info is not None else (0, 1)
        step = self.start + w
        while True:
            yield step, self.prep.step_work(step, self.samples_per_step)
            step += W


class Dist:
    """The process group when launched by ``torchrun`` or ``accelerate launch`` (their env
    variables), else a single process. Gradients are all-reduced by hand after backward:
    the two-pass step calls the model twice per micro-batch, which DDP's wrapper does not expect."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, local_world: int = 1):
        self.rank, self.world, self.local_rank, self.local_world = rank, world, local_rank, local_world

    @classmethod
    def from_env(cls, device: str) -> "Dist":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as td

        if not td.is_initialized():
            td.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        return cls(td.get_rank(), td.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                   int(os.environ.get("LOCAL_WORLD_SIZE", str(td.get_world_size()))))

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as td

            td.barrier()

    def close(self) -> None:
        """Destroy the process group (:meth:`Trainer.run` ends at a barrier), so that no process exits while
        the group's background threads still run. Without it a 2-process gloo run in the tests once aborted
        at exit ("terminate called without an active exception"), the likely cause."""
        import torch.distributed as td

        if self.world > 1 and td.is_initialized():
            td.destroy_process_group()

    def all_reduce_grads(self, params) -> None:
        if self.world == 1:
            return
        import torch.distributed as td

        for p in params:  # sum of the micro-batch terms of every process (each already / n_micro)
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            td.all_reduce(p.grad)

    def all_reduce_metrics(self, agg: dict) -> dict:
        if self.world == 1:
            return agg
        import torch.distributed as td

        t = torch.cat([torch.tensor([agg["loss"], float(agg["n_block_targets"])]),
                       agg["slot_loss_sum"], agg["slot_correct"], agg["slot_count"]]).double()
        td.all_reduce(t)
        D = agg["slot_count"].shape[0]
        return {"loss": float(t[0]), "n_block_targets": int(t[1]), "slot_loss_sum": t[2 : 2 + D].float(),
                "slot_correct": t[2 + D : 2 + 2 * D].float(), "slot_count": t[2 + 2 * D :].float()}

    def max(self, x: float) -> float:
        if self.world == 1:
            return x
        import torch.distributed as td

        t = torch.tensor([x], dtype=torch.float64)
        td.all_reduce(t, op=td.ReduceOp.MAX)
        return float(t)

    def any(self, flag: bool) -> bool:
        """Every process takes the same decision (process 0's clock could differ)."""
        if self.world == 1:
            return flag
        import torch.distributed as td

        t = torch.tensor([1.0 if flag else 0.0])
        td.all_reduce(t, op=td.ReduceOp.MAX)
        return bool(t > 0)


def _combine(outs: list[LossOutput]) -> LossOutput:
    """One LossOutput for a batch run in parts (each part's loss already over the whole batch's norm)."""
    if len(outs) == 1:
        return outs[0]
    n = sum(o.n_block_targets for o in outs)
    block_loss = sum(o.block_loss * o.n_block_targets for o in outs) / max(n, 1)
    return LossOutput(
        sum(o.loss for o in outs), block_loss, None,
        sum(o.slot_loss_sum for o in outs), sum(o.slot_correct for o in outs), sum(o.slot_count for o in outs), n,
    )


def _accumulate(agg: dict | None, out: LossOutput) -> dict:
    cur = {"loss": float(out.loss.detach()), "slot_loss_sum": out.slot_loss_sum, "slot_correct": out.slot_correct,
           "slot_count": out.slot_count, "n_block_targets": out.n_block_targets}
    if agg is None:
        return cur
    return {k: agg[k] + cur[k] for k in agg}


def _append_jsonl(path: Path, rec: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(rec) + "\n")


class FrozenBF16:
    """The frozen float32 parameters of a model, held in bf16 inside ``with`` and float32 outside.

    Entering points each frozen float32 parameter at a bf16 copy made once (the same rounding as
    autocast's casts); leaving points it back at its float32 tensor, which is never written. Shared
    (tied) parameters are handled once. Trainable parameters are left alone. The copies reflect the
    weights at construction: for a frozen base they do not change."""

    def __init__(self, model: torch.nn.Module):
        seen, self._pairs = set(), []
        for prm in model.parameters():
            if prm.requires_grad or prm.dtype != torch.float32 or id(prm) in seen:
                continue
            seen.add(id(prm))
            self._pairs.append((prm, prm.data, prm.data.to(torch.bfloat16)))
        self._low = {id(prm): low for prm, _, low in self._pairs}
        self._depth = 0

    def __len__(self) -> int:
        return len(self._pairs)

    def low_of(self, prm: torch.Tensor) -> torch.Tensor | None:
        """The bf16 copy held for parameter ``prm``, or None where it has none (it trains, or is not float32)."""
        return self._low.get(id(prm))

    def __enter__(self) -> "FrozenBF16":
        if self._depth == 0:
            for prm, _, low in self._pairs:
                prm.data = low
        self._depth += 1
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth == 0:
            for prm, full, _ in self._pairs:
                prm.data = full


def shadow_bf16_linears(model: torch.nn.Module) -> int:
    """Give each frozen ``nn.Linear`` a bf16 copy of its weights, used only inside bf16 autocast.

    Autocast would cast the float32 weight to bf16 at every call (round to nearest); the copy holds
    exactly those values, so results are unchanged. Outside autocast, or with any weight that trains
    or is shared with another module (a tied LM head), the layer runs as before. Returns the number of
    layers given a copy.
    """
    import torch.nn.functional as F

    shared = shared_weights(model)
    n = 0
    for mod in model.modules():
        if type(mod) is not torch.nn.Linear or any(p.requires_grad for p in mod.parameters()):
            continue
        if any(p.data_ptr() in shared for p in mod.parameters()):
            continue  # tied weights (e.g. the LM head and the input embedding): leave them alone
        w16 = mod.weight.detach().to(torch.bfloat16)
        b16 = None if mod.bias is None else mod.bias.detach().to(torch.bfloat16)

        def forward(x, *args, mod=mod, w16=w16, b16=b16, **kwargs):
            dev = x.device.type
            if not args and not kwargs and torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) == torch.bfloat16:
                return F.linear(x.to(torch.bfloat16), w16, b16)
            return torch.nn.Linear.forward(mod, x, *args, **kwargs)

        mod.forward = forward
        mod._sdlm_bf16_weight = w16  # for sdlm.train.fused
        n += 1
    return n


def fully_shard_model(model: torch.nn.Module, dist: "Dist", device: torch.device) -> int:
    """Shard ``model`` over the processes of ``dist`` with FSDP (``fully_shard``): each decoder layer is a
    unit of its own (gathered for its forward and backward, then freed), the rest (embeddings, final
    norm, LM head) one more. In place; returns the number of units."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if device.type == "cuda":
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (dist.world,))
    layers = decoder_layers(model, "fsdp")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return len(layers) + 1


def decoder_layers(model: torch.nn.Module, setting: str = "compile") -> torch.nn.ModuleList:
    """The model's list of decoder layers (:func:`sdlm.model.layer_list`; ``setting``: the recipe key that
    needs them, for the error)."""
    found = layer_list(model)
    if found is None:
        raise SDLMError(f"{type(model).__name__} has no list of decoder layers for {setting}: set {setting}: false")
    return found[1]


def compile_regions(model: torch.nn.Module) -> int:
    """``torch.compile`` the repeated parts of each decoder layer, in place; returns how many modules.

    Every child of a layer is compiled except the attention (a child with a ``layer_idx``: its cache
    update reads the index, so each layer would need a graph of its own), whose own children (the
    projections, with their LoRA) are compiled instead. Modules of one kind share their compiled code
    across layers; shapes are dynamic, so new batch shapes do not recompile.
    """
    import torch._dynamo

    n = 0
    for layer in decoder_layers(model):
        for child in layer.children():
            parts = list(child.children()) if hasattr(child, "layer_idx") else [child]
            for mod in parts:
                mod.compile(dynamic=True)
                n += 1
    # one graph per kind of module and shape family (e.g. q/k/v/o projections), with and without
    # gradients, adapter on and off: more than dynamo's default of 8 per code object
    conf = torch._dynamo.config
    key = "recompile_limit" if hasattr(conf, "recompile_limit") else "cache_size_limit"
    setattr(conf, key, max(getattr(conf, key), 64))
    return n


def _fused_adamw(params: list[torch.Tensor]) -> bool | None:
    """AdamW's fused kernel (one call per step for all tensors) where PyTorch has it for these parameters:
    plain (not sharded) floating-point tensors on a CPU or a CUDA device. On a CPU it took 7.5 ms per step
    for the default adapter's 421 tensors where the loop over them took 24 (clipping included); the same
    update up to float rounding. None: PyTorch's default (sharded FSDP parameters)."""
    plain = all(type(p) is torch.nn.Parameter or type(p) is torch.Tensor for p in params)
    ok = plain and params and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return True if ok else None


def _bf16_supported(device: str) -> bool:
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    # Without native bf16 instructions, CPU bf16 matmuls are emulated, several times slower than
    # float32: autocast only where the CPU has them.
    return native_bf16()


def _plot(metrics: Path, png: Path) -> None:
    """Loss and per-slot accuracy over steps, if matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib not installed: no %s", png)
        return
    rows = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()] if metrics.exists() else []
    train = [r for r in rows if "loss" in r]
    if not train:
        return
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot([r["step"] for r in train], [r["loss"] for r in train])
    a1.set_xlabel("step"); a1.set_ylabel("loss"); a1.set_title("training loss")
    n_slots = len(train[-1]["slot_acc"])
    for j in range(n_slots):
        a2.plot([r["step"] for r in train], [r["slot_acc"][j] for r in train], label=f"slot {j}")
    a2.set_xlabel("step"); a2.set_ylabel("top-1 accuracy"); a2.set_title("per-slot accuracy"); a2.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
