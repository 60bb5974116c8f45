"""Shared fixtures: tiny random causal LMs (Llama, Qwen2) and a byte tokenizer, all built in code.

Everything runs on the CPU in float32 and is seeded, so every test is deterministic.
"""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)

ARCHS = ("llama", "qwen2")
EOS = 256  # the byte tokenizer's end-of-text id (bytes are 0..255)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what ByteLevel pre-tokenizers use)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def byte_tokenizer():
    """A real (saveable) HF tokenizer: ids 0..255 are bytes, 256 is ``<|endoftext|>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    vocab["<|endoftext|>"] = EOS
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def tiny_model(arch: str = "llama", seed: int = 0, vocab_size: int = EOS + 1, attn: str = "sdpa", tie: bool = False):
    """A 2-layer random causal LM (hidden 64, 4 heads, 2 KV heads), float32, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cfg_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    config = cfg_cls(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=512,
        initializer_range=0.1,
        tie_word_embeddings=tie,
        bos_token_id=None,
        eos_token_id=EOS,
        pad_token_id=None,
    )
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = EOS
    return model


def make_sdlm(arch: str = "llama", seed: int = 0, block_size: int = 4, retrofit: bool = True, **model_kw):
    """An SDLM over a tiny random model; retrofitted (``<|mask|>`` added, embeddings resized) by default."""
    from sdlm.model import SDLM

    sdlm = SDLM(tiny_model(arch, seed, **model_kw), byte_tokenizer(), None, name=f"tiny-{arch}-{seed}")
    if retrofit:
        sdlm.retrofit(block_size=block_size)
    return sdlm


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture
def sdlm_model(arch):
    """A retrofitted tiny random SDLM, one per architecture."""
    return make_sdlm(arch, seed=0)


def random_prompt(seed: int, length: int) -> list[int]:
    """A reproducible prompt of byte ids (never the end-of-text id)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (length,), generator=g).tolist()
