"""Shared fixtures and helpers: tiny random causal LMs (Llama, Qwen2) with the byte tokenizer.

Everything runs on the CPU in float32 and is seeded, so every test is deterministic.
The models come from :func:`sdlm.zoo.random_model` (hidden 64, 2 layers, 4 heads, 2 KV heads,
vocab 259 = 256 bytes + bos/eos/pad; retrofitting adds ``<|mask|>`` as id 259).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ARCHS = ("llama", "qwen2")


@pytest.fixture(autouse=True)
def _one_thread(request):
    """Tiny matrices: one thread is faster and immune to other processes competing for the cores."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def make_sdlm(arch: str = "llama", seed: int = 0, block_size: int = 4, retrofit: bool = True, attn: str = "sdpa"):
    """An SDLM over a tiny random model; retrofitted (``<|mask|>`` added, embeddings resized) by default."""
    from sdlm.model import SDLM
    from sdlm.zoo import random_model

    model, tok = random_model(arch, seed)
    if attn != "sdpa":
        model.set_attn_implementation(attn)
    sdlm = SDLM(model, tok, None, name=f"random:{arch}:{seed}")
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
    """A reproducible prompt of byte ids (never a special token)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (length,), generator=g).tolist()


def hf_greedy(sdlm, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy continuation (stops at the generation config's eos like the decoder), with
    transformers' own attention function throughout (:func:`sdlm.attention.plain_sdpa`)."""
    from sdlm.attention import plain_sdpa

    with plain_sdpa():
        out = sdlm.model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False, max_new_tokens=max_new_tokens,
        )
    return out[0, len(prompt):].tolist()


def use_oracle_drafts(sdlm, monkeypatch, sequence: list[int], good=lambda pos: pos % 3 != 0):
    """Make block predictions come true: the real model runs (and fills the real KV cache), then
    each block slot's logits are replaced by a one-hot on ``sequence[target position]`` when
    ``good(target position)``, else left as the (almost never right) untrained prediction.

    Speculative decoding then accepts drafts of varying length and crops the real cache
    accordingly, which is what the equality tests with the uncached decoder and with
    ``generate`` must survive. ``sequence`` is prompt + the AR continuation.
    """
    real = sdlm.step_logits

    def step_logits(step, cache=None, cached_len=0):
        logits = real(step, cache, cached_len).clone()
        n = step.n_logits
        pos, is_block = step.info.pos[-n:], step.info.is_block[-n:]
        for r in range(n):
            target = int(pos[r]) + 1  # slot j at position p+j predicts position p+j+1
            if is_block[r] and target < len(sequence) and good(target):
                logits[r] = -10.0
                logits[r, sequence[target]] = 10.0
        return logits

    monkeypatch.setattr(sdlm, "step_logits", step_logits)


TINY_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """The tiny recipe (a 2-layer Llama on repeated letter patterns) trained for a few seconds:
    its drafts are really accepted (>= 2 tokens per forward at D = 4)."""
    from sdlm.model import SDLM
    from sdlm.train.trainer import TrainConfig, Trainer

    out = tmp_path_factory.mktemp("tiny") / "run"
    cfg = TrainConfig.from_yaml(TINY_RECIPE, {"out_dir": str(out), "steps": 300, "lr": 1.0e-2, "schedule": "constant",
                                              "samples_per_step": 8, "save_every": 0, "eval_every": 0, "heldout": 0})
    Trainer(cfg).run(progress=False)
    return SDLM.load(str(out / "final"))
