"""Lossless decoding on architectures beyond the Llama / Qwen2 pair the other tests use: tiny random models of
each, with drafts accepted in runs of every length (oracle drafts), must write ``transformers``' own greedy
output in modes ``ar`` and ``speculative`` (chain and tree), one prompt at a time and batched. Windows are in
``test_windows.py``.
"""

from __future__ import annotations

import pytest
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from conftest import hf_greedy, random_prompt, tiny, use_oracle_drafts
from sdlm.batched import generate_batch
from sdlm.decode import Decoder, GenerationConfig
from sdlm.model import SDLM

ARCHITECTURES = {  # architecture -> config settings for a tiny model of it
    "qwen3": {}, "mistral": {}, "phi": {}, "phi3": {}, "olmo": {}, "olmo2": {}, "stablelm": {}, "granite": {},
    "cohere": {}, "starcoder2": {}, "glm": {}, "helium": {}, "smollm3": {},
    "gpt2": {}, "gpt_bigcode": {}, "gpt_neox": {"rotary_pct": 0.5}, "gptj": {"rotary_dim": 8},
    "codegen": {"rotary_dim": 8, "n_ctx": 512}, "opt": {"ffn_dim": 128, "word_embed_proj_dim": 64},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {"moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2,
                  "shared_expert_intermediate_size": 32},
    "qwen3_moe": {"moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2},
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2},
}
PROMPTS = [(100, 5), (101, 14)]  # (seed, length)
N_NEW = 20


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_lossless_decoding_equals_generate(arch, monkeypatch):
    if arch not in CONFIG_MAPPING:
        pytest.skip(f"this transformers has no {arch}")
    try:
        model, tok = tiny(arch, **ARCHITECTURES[arch])
    except ValueError as e:  # no sdpa for it in this transformers (GPT-J, CodeGen in 5.17): eager attention
        if "does not support an attention implementation" not in str(e):
            raise
        model, tok = tiny(arch, attn="eager", **ARCHITECTURES[arch])
    s = SDLM(model, tok, None, name=f"random:{arch}")
    s.retrofit(block_size=4)
    prompts = [random_prompt(seed, n) for seed, n in PROMPTS]
    wants = [hf_greedy(s, p, N_NEW) for p in prompts]
    assert any(len(set(w)) > 2 for w in wants)  # not a model stuck on one token, where equality says little
    for mode in ("ar", "speculative"):
        dec = Decoder(s, GenerationConfig(mode=mode, block_size=4, max_new_tokens=N_NEW))
        assert [dec.generate(p).tokens for p in prompts] == wants, mode
        assert [g.tokens for g in generate_batch(dec, prompts)] == wants, mode
    for p, want in zip(prompts, wants):
        for tree in (None, "3,2,1"):
            with monkeypatch.context() as m:
                use_oracle_drafts(s, m, p + want)
                g = Decoder(s, GenerationConfig(mode="speculative", block_size=4, max_new_tokens=N_NEW, tree=tree,
                                                draft_threshold=0.0)).generate(p)
            assert g.tokens == want, tree
            assert g.forwards < g.new_tokens or len(want) < 3  # several tokens per forward
