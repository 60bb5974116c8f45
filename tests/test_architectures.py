"""Architectures beyond the Llama / Qwen2 pair the other tests use, as tiny random models of each.

- Lossless decoding: with drafts accepted in runs of every length (oracle drafts), modes ``ar`` and
  ``speculative`` (chain and tree) write ``transformers``' own greedy output, one prompt at a time and batched.
- The block-gated adapter: it finds the model's linear layers (``nn.Linear`` or GPT-2's ``Conv1D``, under
  whatever the decoder blocks are called), leaves the model's own output untouched, and its two-pass
  training loss equals the dense reference under every training attention.

Windows are in ``test_windows.py``.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from conftest import hf_greedy, random_prompt, use_oracle_drafts
from sdlm.adapter import AdapterConfig, attach, target_layers
from sdlm.attention import not_plain_attention, use_block_attention, use_gathered_attention
from sdlm.batched import generate_batch
from sdlm.decode import Decoder, GenerationConfig
from sdlm.errors import SDLMError
from sdlm.layout import sample_block_starts, training_layout
from sdlm.model import SDLM, layer_list
from sdlm.train.loss import dense_loss, pack, two_pass_loss
from sdlm.train.trainer import Trainer, decoder_layers
from sdlm.zoo import RANDOM_ARCHS, random_model
from test_train import loss_and_grads

ARCHITECTURES = [a for a in RANDOM_ARCHS if a not in ("llama", "qwen2")]  # those two: everywhere else
PROMPTS = [(100, 5), (101, 14)]  # (seed, length)
N_NEW = 20


def retrofitted(arch: str) -> SDLM:
    if arch not in CONFIG_MAPPING:
        pytest.skip(f"this transformers has no {arch}")
    s = SDLM(*random_model(arch), None, name=f"random:{arch}")
    s.retrofit(block_size=4)
    return s


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_lossless_decoding_equals_generate(arch, monkeypatch):
    s = retrofitted(arch)
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


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_retrofit_does_not_depend_on_the_global_random_state(arch):
    # Every table the new mask token grows gets a computed row (the mean of the old ones), including
    # tables besides the input embeddings (Gemma 3n/4's per-layer inputs), never a random one.
    states = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        s = retrofitted(arch)
        states.append(s.model.state_dict())
    assert states[0].keys() == states[1].keys()
    changed = [k for k in states[0] if not torch.equal(states[0][k], states[1][k])]
    assert not changed
    mask = s.config.mask_token_id
    for m in s.model.modules():
        if isinstance(m, torch.nn.Embedding) and m.num_embeddings == mask + 1:
            torch.testing.assert_close(m.weight[mask], m.weight[:mask].mean(0))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_block_adapter_keeps_the_model_and_trains_exactly(arch):
    s = retrofitted(arch)
    prompts = [random_prompt(seed, n) for seed, n in PROMPTS]
    wants = [hf_greedy(s, p, N_NEW) for p in prompts]  # the bare model's own output
    ad = attach(s, AdapterConfig(kind="block-adapter", r=4))
    n_blocks = s.model.config.get_text_config().num_hidden_layers
    assert len(ad.lora_parameters()) >= 2 * 2 * n_blocks  # A and B of at least two linear layers per block
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a non-zero adapter, so that the gate has something to switch off
        for p in ad.lora_parameters().values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    for mode in ("ar", "speculative"):
        dec = Decoder(s, GenerationConfig(mode=mode, block_size=4, max_new_tokens=N_NEW))
        assert [dec.generate(p).tokens for p in prompts] == wants, mode
    lays = []
    for n in (17, 30, 24):
        ids = torch.randint(0, 250, (n,), generator=g)
        lm = torch.zeros(n, dtype=torch.bool)
        lm[6:] = True
        lays.append(training_layout(ids, lm, sample_block_starts(lm, 5, g), 4, s.config.mask_token_id))
    # a row per sample; one row of all three (as the CPU trainer packs a micro-batch); one sample
    batches = [pack(lays), pack(lays, row_tokens=1000), pack(lays[:1])]
    assert [b.input_ids.shape[0] for b in batches] == [3, 1, 1]
    run = functools.partial(loss_and_grads, s, ad)
    refs = [run(dense_loss, b) for b in batches]
    checks = [(run(two_pass_loss, b), r) for b, r in zip(batches, refs)]
    for use in (use_block_attention, use_gathered_attention):
        if not_plain_attention(s.model) is not None:  # soft-capping or sinks: only the model's own attention has them
            with pytest.raises(SDLMError, match="attention: sdpa"):
                use(s.model)
            continue
        use(s.model)
        checks += [(run(two_pass_loss, b), r) for b, r in zip(batches, refs)]
    for (o, go), (r, gr) in checks:
        assert torch.allclose(r.loss, o.loss, atol=1e-5)
        for x, y in zip(gr, go):  # float32, summed in other orders: up to 1.3e-3 of the largest gradient seen
            assert (x - y).abs().max() <= 3e-3 * x.abs().max()  # (gemma4_text); a wrong gradient is off by far more


def _adapted(s: SDLM) -> set[str]:
    return {n for n, m in s.model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}


@pytest.mark.parametrize("arch, adapted, left_out", [
    # peft maps the names of a mixture's old per-expert layers onto its fused expert tensors, whose update would
    # reach every token, and drops the same names from the linear layers: the dense MLP and the shared experts
    ("glm4_moe", ["model.layers.0.mlp.gate_proj", "model.layers.1.mlp.shared_experts.down_proj"],
     ["model.layers.1.mlp.experts"]),
    # multi-head latent attention expands the cached latents at every forward: kv_b_proj's rows are the keys
    ("deepseek_v3", ["model.layers.1.self_attn.kv_a_proj_with_mqa", "model.layers.1.mlp.shared_experts.up_proj"],
     ["model.layers.1.self_attn.kv_b_proj", "model.layers.1.mlp.experts"]),
    # routers that are linear layers returning their routing as well
    ("phimoe", ["model.layers.1.self_attn.o_proj"], ["model.layers.1.mlp.router"]),
    ("llama4_text", ["model.layers.1.feed_forward.shared_expert.gate_proj"], ["model.layers.1.feed_forward.router"]),
    # lists of sublayers that run on every token (two attentions and two MLPs per block) are adapted
    ("longcat_flash", ["model.layers.0.self_attn.1.q_b_proj", "model.layers.1.mlps.0.down_proj",
                       "model.layers.1.mlps.1.up_proj"], ["model.layers.1.self_attn.0.kv_b_proj"]),
    ("dbrx", ["transformer.blocks.1.norm_attn_norm.attn.Wqkv"], []),  # its experts are fused tensors
])
def test_the_adapter_goes_on_the_linear_layers_that_run_one_row_per_token(arch, adapted, left_out):
    s = retrofitted(arch)
    attach(s, AdapterConfig(kind="block-adapter", r=4))
    got = _adapted(s)
    assert set(adapted) <= got
    assert not set(left_out) & got
    assert not any(type(m).__name__ == "ParamWrapper" for m in s.model.modules())  # no update on a whole tensor


class _ListMixture(torch.nn.Module):
    """A mixture that holds its experts as separate linear layers (as older and remote-code models do), each
    run on the tokens routed to it."""

    def __init__(self, width: int, n: int = 4):
        super().__init__()
        self.gate = torch.nn.Linear(width, n, bias=False)
        self.experts = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(n))

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        pick, out = self.gate(flat).argmax(-1), torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            if (rows := (pick == e).nonzero().flatten()).numel():
                out[rows] = expert(flat[rows])
        return out.view_as(x)


def test_experts_held_as_separate_layers_are_left_out():
    s = retrofitted("llama")
    mlp = s.model.model.layers[1].mlp
    mlp.moe = _ListMixture(64, n=8)  # a longer list than the model's 2 layers
    dense = mlp.forward
    mlp.forward = lambda x: dense(x) + mlp.moe(x)  # routed experts beside the MLP's own layers, which stay adapted
    assert layer_list(s.model) == ("model.layers", s.model.model.layers)  # what compile and FSDP take as the layers
    assert decoder_layers(s.model) is s.model.model.layers
    attach(s, AdapterConfig(kind="block-adapter", r=4))
    got = _adapted(s)
    assert {"model.layers.1.mlp.moe.gate", "model.layers.1.mlp.down_proj"} <= got
    assert not {n for n in got if ".experts." in n}


def test_the_layers_of_a_multimodal_model_are_its_language_model_s():
    model, _ = random_model("gemma3", vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                                                     "num_attention_heads": 2, "image_size": 28, "patch_size": 14})
    name, layers = layer_list(model)  # not the vision tower's 3 layers
    assert len(layers) == model.config.get_text_config().num_hidden_layers == 2 and "language_model" in name
    assert all(n.startswith(name) for n in target_layers(model))


def test_adapter_targets_and_layers_select_exactly_and_a_wrong_name_is_refused(monkeypatch):
    s = retrofitted("glm4_moe")
    attach(s, AdapterConfig(kind="block-adapter", r=4, target_modules=["q_proj", "mlp.gate_proj"], layers=[0]))
    assert _adapted(s) == {"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.gate_proj"}
    with pytest.raises(SDLMError, match="already has an adapter"):
        attach(s, AdapterConfig(kind="block-adapter", r=4))
    s = retrofitted("deepseek_v3")
    with pytest.raises(SDLMError, match=r"no linear layers matching \['kv_b_proj'\].*their names: .*q_proj"):
        attach(s, AdapterConfig(kind="block-adapter", r=4, target_modules=["kv_b_proj"]))
    # were such a layer adapted all the same, the first mixed forward says which layer and what to do
    monkeypatch.setattr("sdlm.adapter._per_token", lambda model, names: names)
    attach(s, AdapterConfig(kind="block-adapter", r=4, target_modules=["kv_b_proj"]))
    p = random_prompt(100, 5)
    with pytest.raises(SDLMError, match=r"kv_b_proj does not run one row per token.*leave it out"):
        Decoder(s, GenerationConfig(mode="speculative", block_size=4, max_new_tokens=4)).generate(p)


@pytest.mark.parametrize("arch, plain", [("gpt_oss", False), ("gemma2", False), ("gemma3_text", True), ("llama", True)])
def test_trainer_keeps_the_model_s_own_attention_where_it_is_more_than_softmax(arch, plain):
    s = retrofitted(arch)  # gpt-oss: attention sinks; Gemma 2: soft-capped scores
    pick = Trainer.attention.fget(SimpleNamespace(sdlm=s, cfg=SimpleNamespace(
        attention="auto", max_length=64, block_size=4, retrofit="block-adapter")))
    assert pick == ("blocks" if plain else "sdpa")  # the CPU default where blocks compute the model's attention


def test_a_model_that_fails_the_adapter_s_probe_forward_gets_a_clear_error(monkeypatch):
    s = retrofitted("mixtral")

    def broken(*args, **kwargs):
        raise RuntimeError("no cache here")

    monkeypatch.setattr(s.model, "forward", broken)
    with pytest.raises(SDLMError, match="failed a cached forward of 5 tokens.*no cache here"):
        attach(s, AdapterConfig(kind="block-adapter", r=4))
