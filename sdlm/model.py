"""An SDLM: any Hugging Face causal LM plus a mask token and the SDLM settings.

No forked modeling code: the model is driven only through ``input_ids``,
``position_ids``, a 4D attention mask built from :mod:`sdlm.masks` and a
transformers ``Cache``. Any causal LM that accepts those works.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Sequence

import torch

from .attention import (BlockLayout, CausalSegments, Gathered, RowSplit, active, install_attention, row_split,
                        sdpa_attention, use_decoding_attention)
from .cpu import exact_rows, native, plain_inference, plain_inference_here
from .errors import SDLMError
from .io import atomic_dir
from .kvcache import GrowingLayer, drop_front, dropped_of, layer_offset
from .layout import StepLayout
from .masks import FULL, LayerWindows, TokenInfo, Window, allowed, layer_masks

logger = logging.getLogger(__name__)

MASK_TOKEN = "<|mask|>"
CONFIG_KEY = "sdlm"  # the SDLM settings live under this key in the model's config.json


@dataclass
class SDLMConfig:
    """SDLM settings saved with every retrofitted checkpoint (``config.json`` key ``sdlm``)."""

    block_size: int = 4
    """Block size D the model was trained with (decoding may use another)."""
    mask_token_id: int = -1
    """Id of the mask token in the checkpoint's tokenizer; never hard-coded."""
    mask_token: str = MASK_TOKEN
    ar_loss_weight: float = 1.0
    """Weight of the joint next-token loss on the clean response tokens (0 = the paper's loss)."""
    causal_within_block: bool = False
    """Causal instead of bidirectional attention inside a block."""
    retrofit: str = "untrained"
    """How the blocks were learned: ``untrained``, ``block-adapter``, ``lora`` or ``full``."""
    draft_trees: dict | None = None
    """Calibrated draft trees per decoding block size (``{"4": [[0], [1], [0, 0], ..]}``), used by
    ``--tree auto`` (:mod:`sdlm.tree`; written by ``sdlm calibrate-tree``)."""

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise SDLMError(f"block size must be >= 1, got {self.block_size}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SDLMConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


_WINDOW_KINDS = ("full_attention", "sliding_attention", "chunked_attention")
_RECURRENT_KINDS = ("linear_attention", "conv", "mamba", "hybrid", "recurrent")
_ALIBI_MODELS = ("bloom", "mpt")
_TOKEN_MIXING = {
    "gpt_neo": "its local attention layers apply their window by place in the forward, not by position id",
    "doge": "its feed-forward routing mixes the router outputs of different tokens of a forward",
}
"""Models whose layers tie a token's output to where the other tokens of the forward stand, with the reason."""


def layer_windows(config) -> LayerWindows:
    """The windows of a ``transformers`` model's attention layers, read from its config as ``transformers``
    itself reads it when it builds a model's masks: a config with ``layer_types`` takes a mask per layer
    type; otherwise a ``sliding_window`` (or an ``attention_chunk_size``) applies to every layer."""
    config = config.get_text_config()
    sliding, chunk = getattr(config, "sliding_window", None), getattr(config, "attention_chunk_size", None)
    types = getattr(config, "layer_types", None)
    if types is not None:
        kinds = {"full_attention": None, "sliding_attention": Window(sliding=sliding) if sliding else None,
                 "chunked_attention": Window(chunk=chunk) if chunk else None}
        return LayerWindows({t: kinds[t] for t in dict.fromkeys(types) if t in kinds}, keyed=True)
    if sliding is not None:
        return LayerWindows({None: Window(sliding=sliding)})
    if chunk is not None:
        return LayerWindows({None: Window(chunk=chunk)})
    return FULL


def cache_kinds(config, windows: LayerWindows) -> list | None:
    """Each decoding cache layer's kind of attention (keys of ``windows.windows``), for a model with
    windowed layers whose cache has one layer per decoder layer; else None (nothing is dropped)."""
    config = config.get_text_config()
    n_layers = getattr(config, "num_hidden_layers", None)
    if windows.smallest is None or not n_layers or getattr(config, "num_kv_shared_layers", 0):
        return None
    if not windows.keyed:
        return [None] * n_layers
    types = list(getattr(config, "layer_types", None) or ())
    return types if len(types) == n_layers else None


def check_supported(model) -> None:
    """Refuse, with the reason, a model SDLM cannot run exactly: block tokens are extra tokens of the same
    forward that the model's attention hides from the clean ones by a mask over position ids. Layers that
    carry a recurrent state (state-space, linear-attention or convolution layers) would pass the block
    tokens into the clean tokens' state, ALiBi models take no position ids, and some models tie a token's
    output to the other tokens' places in the forward (:data:`_TOKEN_MIXING`). A looped model (Dory) keeps
    a cache per loop that only a cache built from its config holds. The causal-LM heads of
    encoder (BERT-style) and encoder-decoder architectures are not decoder-only LMs either."""
    from transformers.models.auto import modeling_auto

    config = model.config.get_text_config()
    kind, model_type = type(model).__name__, getattr(config, "model_type", None)
    encoders = {**modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES,
                **modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES}
    if getattr(config, "is_encoder_decoder", False) or model_type in encoders:
        raise SDLMError(f"{kind} is the causal-LM head of {model_type}, an encoder or encoder-decoder architecture "
                        "(its attention and positions are not a decoder-only LM's): SDLM runs decoder-only causal LMs")
    others = sorted(set(getattr(config, "layer_types", None) or ()) - set(_WINDOW_KINDS))
    recurrent = [t for t in others if t in _RECURRENT_KINDS]
    if getattr(model, "_is_stateful", False) or recurrent:
        what = f" ({', '.join(recurrent)} layers)" if recurrent else ""
        raise SDLMError(f"{kind} has layers with a recurrent state{what}: SDLM needs attention in every layer "
                        "(a mask keeps block tokens out of the clean tokens' past); use a transformer model")
    if others:
        raise SDLMError(f"{kind} has {', '.join(others)} layers: SDLM runs models whose layers are all full, "
                        "sliding-window or chunked attention, which its mask over positions confines (attention that "
                        "selects or compresses its keys itself is not confined by it)")
    if model_type in _ALIBI_MODELS or getattr(config, "alibi", False):
        raise SDLMError(f"{kind} uses ALiBi attention biases, which it derives from a padding mask, not from "
                        "position ids: SDLM places block tokens by position id; use a model with rotary or "
                        "learned positions")
    if model_type in _TOKEN_MIXING and (model_type != "gpt_neo" or "local" in getattr(config, "attention_layers", ())):
        raise SDLMError(f"{kind} cannot run SDLM exactly: {_TOKEN_MIXING[model_type]}, so the block tokens "
                        "appended to a forward would change the clean tokens' outputs")
    if (loops := getattr(config, "n_recurrent_loops", None) or 1) > 1:  # Dory
        raise SDLMError(f"{kind} runs its recurrent layers {loops} times per forward, with a KV cache per loop that "
                        "it adds to a cache built from its config: SDLM decodes with a cache of its own, which does "
                        "not set up those loops' entries; use a model that runs each of its layers once per forward")
    takes = _parameters(type(model).forward)
    if not {"cache", "past_key_values"} & takes or "position_ids" not in takes:
        raise SDLMError(f"{kind} takes no {'KV cache' if 'position_ids' in takes else 'position ids'} in its forward: "
                        "SDLM decodes with a KV cache and places block tokens by position id")


def probe_ids(model, n: int) -> torch.Tensor:
    """(1, n) token ids 1 .. n (within the vocabulary) on ``model``'s device, for the small forwards that
    check what a model does."""
    dev = next(model.parameters()).device
    return torch.arange(1, n + 1, device=dev)[None] % model.config.get_text_config().vocab_size


@contextlib.contextmanager
def evaluating(model):
    """``model`` in eval mode inside (no dropout), in its own mode again after."""
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


@torch.no_grad()
def check_positions(model) -> None:
    """Refuse a model that ignores the position ids it is given (TrOCR counts its positions from its cache
    length): block tokens, a batch's padded rows and a draft tree's nodes stand at positions other than
    their places in the forward. Two forwards of 3 tokens whose last position differs must differ; a model
    these calls do not fit is left to fail where it is used."""
    ids = probe_ids(model, 3)
    try:
        with evaluating(model):
            a, b = (model(input_ids=ids, position_ids=torch.tensor([[0, 1, last]], device=ids.device)).logits[0, -1]
                    for last in (2, 7))
    except Exception:  # noqa: BLE001 - cannot tell
        return
    if torch.equal(a, b):
        raise SDLMError(f"{type(model).__name__} ignores the position ids it is given (its output at a token does not "
                        "change with the token's position id): SDLM places block tokens by position id")


def _crop(cache, n_remove: int) -> None:
    """Remove the last ``n_remove`` entries of a transformers cache.

    ``crop`` takes a negative count in every transformers 5 release (5.17 also
    read a positive number as a length, 5.23+ refuses it). ``crop(0)`` would
    empty the cache in 5.17, hence the guard.
    """
    if n_remove > 0:
        cache.crop(-n_remove)


def decoder_of(model):
    """The decoder stack of a causal LM (the module that returns ``last_hidden_state``), or None: the first
    module that takes ``input_ids`` of ``get_decoder()`` (which falls back to the model itself where the stack
    is not under the attribute its class names: ``Llama4ForCausalLM`` keeps it as ``model``; and which gives
    ModernBERT-decoder's output layer, named ``decoder`` as in BERT's heads), ``base_model`` and ``model``."""
    get = getattr(model, "get_decoder", None)
    for dec in (get() if callable(get) else None, getattr(model, "base_model", None), getattr(model, "model", None)):
        if isinstance(dec, torch.nn.Module) and dec is not model and "input_ids" in _parameters(dec.forward):
            return dec
    return None


def layer_list(model) -> tuple[str, torch.nn.ModuleList] | None:
    """The model's list of decoder layers, with its full name, or None: the longest ``ModuleList`` directly
    under its decoder stack (:func:`decoder_of`; ``model.layers``, GPT-2's ``transformer.h``, DBRX's
    ``transformer.blocks``), so never a list inside a layer (a mixture's experts held as separate layers) or
    in another tower (a vision encoder). Where no decoder stack holds one: the list with an entry per hidden
    layer, else the longest list."""
    names = {id(mod): name for name, mod in model.named_modules()}
    dec = decoder_of(model)
    own = [c for c in dec.children() if isinstance(c, torch.nn.ModuleList) and len(c)] if dec is not None else []
    if own:
        best = max(own, key=len)
        return names[id(best)], best
    lists = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, torch.nn.ModuleList) and len(mod)]
    n_layers = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    exact = [item for item in lists if len(item[1]) == n_layers]
    return exact[0] if exact else max(lists, key=lambda item: len(item[1]), default=None)


def _parameters(fn) -> set[str]:
    return set(inspect.signature(fn).parameters)


def _to(mask, device):
    """A mask, or a dict of them by layer type, on ``device``."""
    if isinstance(mask, dict):
        return {k: v.to(device) for k, v in mask.items()}
    return None if mask is None else mask.to(device)


@functools.lru_cache(maxsize=None)
def _cache_kwarg_of(forward) -> str:
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def _cache_kwarg(model) -> str:
    """The name ``model.forward`` takes its KV cache by: transformers 5.24 renamed ``past_key_values``
    to ``cache`` (the old name warns); 5.17 knows only the old one. Looked up once per model class."""
    return _cache_kwarg_of(type(model).forward)


def _keep_tail(cache, start: int, idx) -> None:
    """Keep cache entries ``0 .. start-1`` and then ``start + idx`` (transformers 5 layered caches; entries
    of the sequence, so a layer whose first entries were dropped (:func:`sdlm.kvcache.drop_front`) counts
    from its own first one)."""
    sels: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(cache.layers):
        if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
            continue
        if hasattr(layer, "cumulative_length"):
            raise SDLMError("draft trees need a full KV cache; this model has sliding-window layers: drop --tree")
        first = start - layer_offset(cache, i)
        if first not in sels:
            sels[first] = torch.as_tensor(list(idx), dtype=torch.long, device=layer.keys.device) + first
        sel = sels[first]
        if isinstance(layer, GrowingLayer) and layer.keep(first, sel):  # in place, in its buffer
            continue
        layer.keys = torch.cat([layer.keys[..., :first, :], layer.keys.index_select(-2, sel)], -2)
        layer.values = torch.cat([layer.values[..., :first, :], layer.values.index_select(-2, sel)], -2)


class SDLM:
    """A causal LM with SDLM settings, and the one forward function every decoder uses."""

    def __init__(self, model, tokenizer, config: SDLMConfig | None, name: str = ""):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.name = name
        self.adapter = None  # sdlm.adapter.Adapter when a LoRA adapter is attached
        # (B, T) bool, True on block tokens, or True: every token is one; read by gated adapters
        self.gate: torch.Tensor | bool | None = None
        self.gate_columns: dict = {}  # values derived from the gate, kept for one forward (sdlm.adapter)
        # bf16 / fp16 on a CPU: decoding steps run their causal rows' attention as one-token steps would
        # (_row_split); False: every step's attention in one call (faster, and only close to ar's numbers)
        self.row_exact = True
        check_supported(model)
        check_positions(model)
        head = model.get_output_embeddings()  # checked here, before a trainer shards or transforms the model:
        self._head_gives_logits = head is not None and self._logits_are(head)  # the head on the hidden states
        self.windows = layer_windows(model.config)  # sliding-window or chunked layers, if any
        self.cache_kinds = cache_kinds(model.config, self.windows)  # for dropping what windows hide (trim)
        use_decoding_attention(model)  # sdpa without copying grouped keys and values per query head
        params = inspect.signature(model.forward).parameters
        self._takes_logits_to_keep = "logits_to_keep" in params
        self._cache_kwarg = _cache_kwarg(model)

    # ------------------------------------------------------------ loading

    @classmethod
    def load(cls, name: str, dtype: torch.dtype = torch.float32, device: str = "cpu", quiet: bool = False,
             prepack: bool | None = None) -> "SDLM":
        """Load a model by name and restore its SDLM settings.

        ``name``: an adapter folder (``sdlm_adapter.json``: base model + block adapter), or
        anything :func:`sdlm.zoo.load_base` takes (local HF folder, built-in name,
        ``random:<arch>``, Hub id).

        ``prepack``: route the linear layers through oneDNN-packed weights for inference
        (:meth:`prepack`); ``None`` (default): on for a CPU where the build supports it, the packed products
        are the faster ones for this dtype (:func:`sdlm.cpu.packing_pays`: not float32 on an Intel CPU with
        MKL) and the copies fit in half the memory still available. True forces them. Pass False for a
        model that will train.
        """
        sdlm = cls._load(name, dtype, device, quiet)
        if sdlm.device.type == "cpu" and not native(dtype):
            logger.warning("this CPU has no native instructions for %s: its products are emulated, several times "
                           "slower than float32 (load in float32, --dtype float32, on this CPU)", dtype)
        sdlm._prepack_if(prepack)
        return sdlm

    @classmethod
    def _load(cls, name: str, dtype: torch.dtype, device: str, quiet: bool) -> "SDLM":
        from .adapter import is_adapter_folder, load_adapter
        from .zoo import builtin_adapter, load_base

        shipped = builtin_adapter(name) if isinstance(name, str) else None
        if shipped is not None:
            sdlm = load_adapter(shipped, dtype=dtype, device=device, prepack=False)
            sdlm.name = name
            return sdlm
        if is_adapter_folder(name):
            return load_adapter(name, dtype=dtype, device=device, prepack=False)

        model, tokenizer = load_base(name, dtype=dtype, device=device)
        raw = getattr(model.config, CONFIG_KEY, None)
        config = None
        if raw:
            config = SDLMConfig.from_dict(raw)
            tok_id = tokenizer.convert_tokens_to_ids(config.mask_token)
            if tok_id != config.mask_token_id:
                raise SDLMError(
                    f"cannot read checkpoint {name}: its SDLM settings name mask token "
                    f"{config.mask_token!r} with id {config.mask_token_id}, but the tokenizer gives id {tok_id}; "
                    "save the model and tokenizer together with `sdlm retrofit` or SDLM.save"
                )
        sdlm = cls(model, tokenizer, config, name)  # refuses a model it cannot run before any advice below
        if config is None and not quiet:
            logger.warning(
                "%s has no SDLM settings (it has not been retrofitted): modes 'ar' and 'speculative' work "
                "at about one token per forward; retrofit and train it for speed", name
            )
        return sdlm

    def prepack(self) -> int:
        """Run the model's linear layers on oneDNN-packed copies of their weights in inference calls on a
        CPU (:func:`sdlm.cpu.prepack_linears`): faster decoding, the same tokens in float32. Training
        calls and other devices run as before. Returns the number of layers routed."""
        from .cpu import prepack_linears

        return prepack_linears(self.model)

    def _prepack_if(self, prepack: bool | None) -> None:
        """:meth:`prepack` if ``prepack``; with None, where the CPU supports it, packing pays for this dtype there
        and the copies fit in memory."""
        if prepack is None:
            from .cpu import can_prepack, packing_pays, room_to_prepack

            prepack = (can_prepack(self.dtype, self.device) and packing_pays(self.dtype)
                       and room_to_prepack(self.model))
        if prepack:
            self.prepack()

    def unpack(self) -> int:
        """Undo :meth:`prepack` and free the packed copies. Returns the number of layers restored."""
        from .cpu import unpack_linears

        return unpack_linears(self.model)

    @property
    def is_retrofitted(self) -> bool:
        return self.config is not None

    def retrofit(self, block_size: int = 4, **settings) -> SDLMConfig:
        """Add the mask token (embedding row = mean of the others) and attach SDLM settings.

        A model that already has settings keeps its mask token; only the block
        size and the given settings change.
        """
        if block_size < 1:
            raise SDLMError(f"block size must be >= 1, got {block_size}")
        if self.config is not None:
            for k, v in settings.items():
                setattr(self.config, k, v)
            self.config.block_size = block_size
        else:
            mask_id = add_mask_token(self.model, self.tokenizer)
            self.config = SDLMConfig(block_size=block_size, mask_token_id=mask_id, **settings)
        setattr(self.model.config, CONFIG_KEY, self.config.to_dict())
        return self.config

    def save(self, path: str | os.PathLike, state_dict: dict | None = None) -> Path:
        """Write model, tokenizer and SDLM settings as an HF folder, atomically. ``state_dict``: the
        weights to write instead of the model's own (a sharded model's, gathered whole)."""
        path = Path(path)
        if self.config is not None:
            setattr(self.model.config, CONFIG_KEY, self.config.to_dict())
        with atomic_dir(path) as tmp:
            self.model.save_pretrained(tmp, state_dict=state_dict)
            self.tokenizer.save_pretrained(tmp)
        return path

    # ------------------------------------------------------------ properties

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def max_positions(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    def eos_token_ids(self) -> set[int]:
        """End-of-sequence ids: the generation config's (what ``generate`` stops at), else the tokenizer's."""
        ids: set[int] = set()
        gen = getattr(self.model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        if eos is None:
            eos = self.tokenizer.eos_token_id
        if isinstance(eos, int):
            ids.add(eos)
        elif eos is not None:
            ids.update(int(e) for e in eos)
        return ids

    # ------------------------------------------------------------ forward

    @torch.inference_mode()
    def step_logits(self, step: StepLayout, cache=None, cached_len: int = 0) -> torch.Tensor:
        """Run one decoding forward over ``step``'s new tokens; return the last ``n_logits`` logits.

        The keys are the ``cached_len`` cached committed tokens (clean, positions
        ``0 .. cached_len-1``) followed by the new tokens. Returns (n_logits, V) float32.
        With a cache, the new tokens' KV is appended to it: the caller crops what
        must not stay.
        """
        return self._run_step(step, cache, cached_len).float()

    @torch.inference_mode()
    def step_hidden(self, step: StepLayout, cache=None, cached_len: int = 0) -> torch.Tensor:
        """:meth:`step_logits` without the LM head: the last ``n_logits`` final hidden states (n_logits, H),
        for a decoder that needs the logits of only some of them (:meth:`head_logits`)."""
        return self._run_step(step, cache, cached_len, hidden=True)

    def _run_step(self, step: StepLayout, cache, cached_len: int, hidden: bool = False) -> torch.Tensor:
        """The last ``n_logits`` rows of ``step``'s logits (or final hidden states), run as :meth:`_step_calls`
        says, each call under its row split."""
        T, n, outs = len(step.input_ids), step.n_logits, []
        for rows, mask, split in self._step_calls(step, cached_len, cache):
            need = max(0, rows.stop - max(rows.start, T - n))  # of the last n rows, those in this call
            with row_split(split), exact_rows(split.leading_causal() if split is not None else 0):
                out = self.forward(step.input_ids[None, rows], step.info.pos[None, rows], mask,
                                   step.info.is_block[None, rows], cache, max(need, 1), hidden=hidden)
            if need:
                outs.append(out[0, -need:])
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _step_calls(self, step: StepLayout, cached_len: int, cache=None) -> list[tuple[slice, object, RowSplit | None]]:
        """The model calls that run ``step``: (its rows, their mask, their row split), in order. One call over
        every row, except where a row split (:meth:`_row_split`) meets a step that fills an empty cache with a
        prompt and its block: the prompt first, as an ``ar`` decoder's prefill, then the block, so that the
        prompt's rows go through the linear layers in a call of their own too."""
        split = self._row_split(step, cached_len)
        mask = self._step_mask(step, cached_len, cache)
        T = len(step.input_ids)
        lead = split.leading_causal() if split is not None and split.first and cache is not None else 0
        if not 0 < lead < T:
            return [(slice(0, T), mask, split)]

        def cut(m: torch.Tensor, rows: slice) -> torch.Tensor:  # a call's keys: the cache, then the rows up to its last
            return m[..., rows, : m.shape[-1] - (T - rows.stop)]

        return [(rows, {k: cut(m, rows) for k, m in mask.items()} if isinstance(mask, dict) else cut(mask, rows),
                 split.part(rows.start, rows.stop)) for rows in (slice(0, lead), slice(lead, T))]

    @torch.inference_mode()
    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The logits (N, V) float32 of final hidden states (N, H) from :meth:`step_hidden`."""
        return self.lm_head()(hidden).float()

    def _row_split(self, step: StepLayout, cached_len: int) -> RowSplit | None:
        """For a bf16 or fp16 model on a CPU, how ``step``'s attention runs row by row (:class:`RowSplit`),
        so that its causal rows get the numbers a one-token step gives them, as the packed linear layers
        already do in calls of up to :data:`sdlm.cpu.PACK_HINT` rows (in a larger step the causal rows run
        as a call of their own: :func:`sdlm.cpu.exact_rows`); and a speculative step commits exactly
        ``ar``'s tokens. None elsewhere (float32, whose products differ in their last bits by row count, or
        another device) and with :attr:`row_exact` off."""
        if not self.row_exact or self.device.type != "cpu" or self.dtype not in (torch.bfloat16, torch.float16):
            return None
        return RowSplit(step.info.is_block.tolist(), step.visible, first=cached_len == 0)

    def _step_mask(self, step: StepLayout, cached_len: int, cache=None) -> torch.Tensor:
        cached = TokenInfo.clean(torch.arange(cached_len))
        keys = TokenInfo.cat([cached, step.info])
        causal_within_block = self.config.causal_within_block if self.config else False
        ok = allowed(step.info, keys, causal_within_block)
        if step.visible is not None:  # a draft tree: nodes of other branches are hidden
            ok[..., cached_len:] &= step.visible
        # (1, 1, T, cached+T), or one per kind of layer
        return self.masks(ok, step.info.pos, keys.pos, dropped=dropped_of(cache) if cache is not None else None)

    def masks(self, ok: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, dtype: torch.dtype | None = None,
              dropped: dict | None = None):
        """The attention mask(s) this model's layers take for the rule's boolean ``ok`` (..., Tq, Tk), queries
        at ``q_pos`` (..., Tq) over keys at ``k_pos`` (..., Tk): :func:`sdlm.masks.layer_masks` with this
        model's windows (one additive mask unless a sliding window or chunk hides more), without the columns
        of keys ``dropped`` from the front of a kind of layer's cache."""
        return layer_masks(ok, q_pos, k_pos, self.windows, dtype or self.dtype, dropped)

    def trim(self, cache, first: int | torch.Tensor, alive: torch.Tensor | None = None,
             k_pos: torch.Tensor | None = None) -> None:
        """Drop from the front of a decoding cache's windowed layers (sliding windows, chunks) the entries
        that no query of this forward or a later one can see: every query is at position ``first`` or
        later (the first token not yet in the cache). Memory and attention over such layers then stay
        within the window as the context grows. A batch gives ``first`` per row (B,), with ``alive`` and
        ``k_pos`` (B, S): what each cache column holds for each row; a column leaves only when no row can
        see it. Nothing is dropped where the cache's layers are not one per decoder layer."""
        kinds = self.cache_kinds
        if kinds is None or cache is None:
            return
        done = dropped_of(cache)
        for kind, w in self.windows.windows.items():
            if w is None:
                continue
            if alive is None:
                n = w.unseen_before(int(first)) - done.get(kind, 0)
            else:  # the leading columns that every row either holds no key in or can no longer see
                gone = ~alive | (k_pos < w.unseen_before(first)[:, None])
                n = int(gone.int().cumprod(1).sum(1).min()) if gone.shape[1] else 0
                n -= done.get(kind, 0)
            if n > 0 and not drop_front(cache, kinds, kind, n):
                self.cache_kinds = None  # layers that share keys or several per decoder layer: keep them all
                return

    def forward(self, input_ids, position_ids, mask4d, gate, cache=None, logits_to_keep: int | torch.Tensor = 0,
                hidden: bool = False):
        """The one call into the HF model. ``gate`` (B, T) marks block tokens for gated adapters;
        ``True``: every token is a block token (the adapter runs without a gate multiply).

        ``mask4d`` None: plain causal attention over the cache and the new tokens (the model builds it); a
        4D mask, or a dict of them by layer type (:meth:`masks`);
        a :class:`sdlm.attention.BlockLayout` or :class:`sdlm.attention.CausalSegments`: a training step's
        block or clean pass, for a model set up with :func:`sdlm.attention.use_block_attention`; a
        :class:`sdlm.gathered.Gathered` layout: either pass, for one set up with
        :func:`sdlm.attention.use_gathered_attention`.
        ``hidden``: return the decoder's last hidden states (B, T, H) instead of logits (the caller
        applies :meth:`lm_head` itself, e.g. in chunks)."""
        dev = self.device
        kwargs = {}
        model, cache_kwarg = self.model, self._cache_kwarg
        if hidden:
            model = decoder_of(self.model)
            if model is None:
                raise SDLMError(f"{type(self.model).__name__} exposes no decoder stack (get_decoder() or .model): "
                                "its final hidden states cannot be read apart from its logits")
            cache_kwarg = _cache_kwarg(model)
        elif self._takes_logits_to_keep:
            kwargs["logits_to_keep"] = logits_to_keep
        self.gate = True if gate is True else gate.to(dev)
        self.gate_columns = {}
        adapter = getattr(self, "adapter", None)
        if adapter is not None and adapter.config.kind == "block-adapter":
            adapter.set_active(self.gate is True or bool(self.gate.any()))  # no block token: skip the LoRA work
        pattern = contextlib.nullcontext()
        if isinstance(mask4d, (BlockLayout, CausalSegments, Gathered)):  # a training pass's pattern (sdlm.attention)
            # the model passes a 4D mask through untouched; the pattern's attention does not read it
            pattern, mask4d = active(mask4d.to(dev)), torch.zeros(1, 1, 1, 1, dtype=self.dtype, device=dev)
        try:
            with pattern, plain_inference(plain_inference_here(dev)):
                out = model(
                    input_ids=input_ids.to(dev),
                    position_ids=position_ids.to(dev),
                    attention_mask=_to(mask4d, dev),
                    use_cache=cache is not None,
                    **{cache_kwarg: cache},
                    **kwargs,
                )
        finally:
            self.gate, self.gate_columns = None, {}
        return out.last_hidden_state if hidden else out.logits

    def lm_head(self) -> torch.nn.Module:
        """The output layer that turns :meth:`forward`'s hidden states into logits, for models whose
        logits are exactly that layer's output (no final soft-capping or logit scale, no transform before it:
        checked on 3 tokens when the SDLM is made, before a trainer shards or transforms the model)."""
        cfg = self.model.config
        for key in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
            if getattr(cfg, key, None) not in (None, 1, 1.0):
                raise SDLMError(f"{type(self.model).__name__} post-processes its logits ({key}): "
                                "its LM head alone does not give them")
        if not self._head_gives_logits:
            raise SDLMError(f"{type(self.model).__name__}'s logits are not its output layer applied to its decoder's "
                            "final hidden states (its head transforms them first)")
        return self.model.get_output_embeddings()

    @torch.no_grad()
    def _logits_are(self, head: torch.nn.Module) -> bool:
        """Whether ``head`` on the decoder's final hidden states gives the model's logits, on 3 tokens (a head
        that transforms the hidden states first, as ModernBERT-decoder's does, gives others)."""
        dec = decoder_of(self.model)
        if dec is None:
            return False
        ids = probe_ids(self.model, 3)
        pos = torch.arange(3, device=ids.device)[None]
        try:
            with evaluating(self.model):
                logits = self.model(input_ids=ids, position_ids=pos).logits.float()
                mine = head(dec(input_ids=ids, position_ids=pos).last_hidden_state).float()
        except Exception:  # noqa: BLE001 - a model these calls do not fit: its logits come from its own forward
            return False
        return torch.allclose(mine, logits, rtol=1e-2, atol=1e-3 * float(logits.abs().max()))

    @staticmethod
    def crop(cache, n_remove: int) -> None:
        _crop(cache, n_remove)

    @staticmethod
    def keep_tail(cache, start: int, idx: Sequence[int]) -> None:
        """Keep the first ``start`` cache entries, then entries ``start + idx`` in that order; drop the rest."""
        _keep_tail(cache, start, idx)


FLEX_ATTENTION = "sdlm_flex"
_compiled_flex = None


def use_flex_attention(model) -> None:
    """Let ``model`` take flex-attention block masks (:func:`sdlm.masks.block_mask`) as attention masks.

    Registers one attention function with ``transformers``: a ``BlockMask`` runs through flex
    attention (compiled on CUDA; eager elsewhere, where PyTorch runs it forward only), any other
    mask (a 4D tensor, or None for plain causal) through sdpa as before, so decoding keeps
    working on the same model.
    """
    from torch.nn.attention.flex_attention import BlockMask

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if not isinstance(attention_mask, BlockMask):
            return sdpa_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        if dropout:
            raise SDLMError("flex attention runs without attention dropout: set the model's attention_dropout to 0")
        out = _flex(query.device)(query, key, value, block_mask=attention_mask, scale=scaling,
                                  enable_gqa=query.shape[1] != key.shape[1])
        return out.transpose(1, 2).contiguous(), None

    install_attention(model, FLEX_ATTENTION, attention)


def _flex(device: torch.device):
    """``flex_attention``, compiled once on CUDA (its fused kernels only exist compiled)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex


def add_mask_token(model, tokenizer, token: str = MASK_TOKEN) -> int:
    """Add ``token`` as a special token; give it the mean input (and output) embedding row.

    The mean row makes the mask's output logit the mean of the others, so an
    untrained mask token is never the greedy choice; decoders also suppress it.
    """
    existing = tokenizer.convert_tokens_to_ids(token)
    if existing is not None and existing != tokenizer.unk_token_id and token in tokenizer.get_vocab():
        mask_id = existing
    else:
        tokenizer.add_tokens([token], special_tokens=True)
        mask_id = tokenizer.convert_tokens_to_ids(token)
    emb = model.get_input_embeddings()
    n_old = emb.weight.shape[0]
    sizes = {name: m.num_embeddings for name, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}
    if mask_id >= n_old:
        model.resize_token_embeddings(mask_id + 1, mean_resizing=False)
    with torch.no_grad():
        rows = min(n_old, mask_id) if mask_id < n_old else n_old
        inp = model.get_input_embeddings().weight
        inp[mask_id] = inp[:rows].mean(0)
        # Every table the resize grew (also Gemma 3n/4's per-layer input embeddings): its new rows would
        # otherwise be drawn from the global random state, so a retrofit would not be reproducible.
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Embedding) and name in sizes and m.num_embeddings > sizes[name]:
                m.weight[sizes[name]:] = m.weight[: sizes[name]].mean(0)
        out = model.get_output_embeddings()
        if out is not None and out.weight.data_ptr() != inp.data_ptr():
            out.weight[mask_id] = out.weight[:rows].mean(0)
            bias = getattr(out, "bias", None)
            if bias is not None:
                bias[mask_id] = bias[:rows].mean()
    return mask_id
