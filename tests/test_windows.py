"""Models whose layers see only part of the past (sliding windows, chunked attention), and models SDLM
refuses. Every lossless mode must still write ``transformers``' own greedy output once the context is longer
than the window, and the training layout must still give the decoder's logits.

The tiny models have a window of 6 positions, so prompts of 5 to 14 tokens and 24 new ones cross it many
times; each case checks first that the window changes the model's own output (else it would test nothing).
"""

from __future__ import annotations

import contextlib
import copy
from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from conftest import hf_greedy, random_prompt, use_oracle_drafts
from sdlm.adapter import AdapterConfig, attach
from sdlm.attention import use_block_attention, use_gathered_attention
from sdlm.batched import generate_batch
from sdlm.decode import Decoder, GenerationConfig
from sdlm.errors import SDLMError
from sdlm.layout import TrainingLayout, ar_step, sample_block_starts, speculative_step, training_layout
from sdlm.kvcache import plain_cache
from sdlm.masks import FULL, LayerWindows, TokenInfo, Window, additive, allowed, layer_masks
from sdlm.model import SDLM
from sdlm.tpf import block_drafts, tokens_per_forward
from sdlm.train.loss import dense_loss, pack, two_pass_loss
from sdlm.train.trainer import Trainer
from sdlm.zoo import random_model

W = 6
SLIDING, FULL_ATTN, CHUNKED = "sliding_attention", "full_attention", "chunked_attention"
# (architecture, config settings, the windows SDLM must read from them)
CASES = {
    "mistral": ({"sliding_window": W}, LayerWindows({None: Window(sliding=W)})),
    "qwen2": ({"use_sliding_window": True, "sliding_window": W, "max_window_layers": 0, "layer_types": [SLIDING] * 2},
              LayerWindows({SLIDING: Window(sliding=W)}, keyed=True)),
    "phi3": ({"sliding_window": W}, LayerWindows({None: Window(sliding=W)})),
    "starcoder2": ({"sliding_window": W}, LayerWindows({None: Window(sliding=W)})),
    "olmo3": ({"sliding_window": W, "layer_types": [SLIDING, FULL_ATTN]},
              LayerWindows({SLIDING: Window(sliding=W), FULL_ATTN: None}, keyed=True)),
    "cohere2": ({"sliding_window": W, "layer_types": [SLIDING, FULL_ATTN]},
                LayerWindows({SLIDING: Window(sliding=W), FULL_ATTN: None}, keyed=True)),
    "gpt_oss": ({"sliding_window": W, "layer_types": [SLIDING, FULL_ATTN], "num_local_experts": 4,
                 "num_experts_per_tok": 2, "attn": "eager"},  # attention sinks; no sdpa for it in transformers
                LayerWindows({SLIDING: Window(sliding=W), FULL_ATTN: None}, keyed=True)),
    "gemma2": ({"sliding_window": W, "layer_types": [SLIDING, FULL_ATTN]},
               LayerWindows({SLIDING: Window(sliding=W), FULL_ATTN: None}, keyed=True)),
    "gemma3_text": ({"sliding_window": W, "layer_types": [SLIDING, FULL_ATTN]},
                    LayerWindows({SLIDING: Window(sliding=W), FULL_ATTN: None}, keyed=True)),
    # the LM of a multimodal checkpoint (Gemma3ForConditionalGeneration): the windows are its text config's
    "gemma3": ({"text_config": {"sliding_window": W, "layer_types": [SLIDING, FULL_ATTN],
                                "tie_word_embeddings": False}},
               LayerWindows({SLIDING: Window(sliding=W), FULL_ATTN: None}, keyed=True)),
    "llama4_text": ({"attention_chunk_size": W, "layer_types": [CHUNKED, FULL_ATTN], "num_local_experts": 2,
                     "intermediate_size_mlp": 128}, LayerWindows({CHUNKED: Window(chunk=W), FULL_ATTN: None}, keyed=True)),
}
PROMPTS = [(100, 5), (101, 14)]  # (seed, length)
N_NEW = 24


def windowed(arch: str, window: int = W) -> SDLM:
    settings = copy.deepcopy(CASES[arch][0])
    for where in (settings, settings.setdefault("text_config", {})):
        for key in ("sliding_window", "attention_chunk_size"):
            if key in where:
                where[key] = window
    if not settings["text_config"]:
        del settings["text_config"]
    s = SDLM(*random_model(arch, **settings), None, name=f"windowed:{arch}")
    s.retrofit(block_size=4)
    return s


@pytest.mark.parametrize("arch", list(CASES))
def test_windows_are_read_from_the_config(arch):
    s = windowed(arch)
    assert s.windows == CASES[arch][1]
    assert s.windows.smallest == W
    assert SDLM(*random_model("llama"), None).windows == FULL and FULL.smallest is None


def test_layer_masks_apply_each_window_only_where_it_hides_something():
    info = TokenInfo.clean(torch.arange(10))
    ok = allowed(info, info)
    rule = additive(ok, torch.float32)
    lw = LayerWindows({SLIDING: Window(sliding=4), FULL_ATTN: None, CHUNKED: Window(chunk=3)}, keyed=True)
    # positions 0..2: no window hides anything yet, so every layer takes the rule's mask
    few = TokenInfo.clean(torch.arange(3))
    assert torch.equal(layer_masks(allowed(few, few), few.pos, few.pos, lw, torch.float32),
                       additive(allowed(few, few), torch.float32))
    masks = layer_masks(ok, info.pos, info.pos, lw, torch.float32)
    assert set(masks) == {SLIDING, FULL_ATTN, CHUNKED} and torch.equal(masks[FULL_ATTN], rule)
    q, k = info.pos[:, None], info.pos[None, :]
    assert torch.equal(masks[SLIDING], additive(ok & (k > q - 4), torch.float32))
    assert torch.equal(masks[CHUNKED], additive(ok & (k // 3 == q // 3), torch.float32))
    # a model that takes one mask gets its one window's mask; so does a keyed one whose layers all have it
    single = layer_masks(ok, info.pos, info.pos, LayerWindows({None: Window(sliding=4)}), torch.float32)
    assert torch.equal(single, masks[SLIDING])
    alike = layer_masks(ok, info.pos, info.pos, LayerWindows({SLIDING: Window(sliding=4)}, keyed=True), torch.float32)
    assert torch.equal(alike, masks[SLIDING])
    # block tokens: the window counts from the block token's own position
    blk = TokenInfo(torch.tensor([7, 8, 9]), torch.zeros(3, dtype=torch.long), torch.full((3,), 7))
    keys = TokenInfo.cat([TokenInfo.clean(torch.arange(7)), blk])
    got = Window(sliding=4).keep(blk.pos, keys.pos) & allowed(blk, keys)
    assert got[2].nonzero().flatten().tolist() == [6, 7, 8, 9]  # slot 2 at position 9: keys at 6 .. 9


def test_dropping_the_window_breaks_equality_with_generate():
    """The teeth of the tests below: with the window's masks left out, the decoder no longer writes the
    model's output past the window."""
    s = windowed("mistral")
    prompt = random_prompt(101, 14)
    want = hf_greedy(s, prompt, N_NEW)
    assert hf_greedy(windowed("mistral", window=512), prompt, N_NEW) != want  # the window matters here
    s.windows = FULL
    assert Decoder(s, GenerationConfig(mode="ar", block_size=4, max_new_tokens=N_NEW)).generate(prompt).tokens != want


@pytest.mark.parametrize("arch", list(CASES))
def test_lossless_modes_equal_generate_past_the_window(arch, monkeypatch):
    s = windowed(arch)
    wide = windowed(arch, window=512)
    prompts = [random_prompt(seed, n) for seed, n in PROMPTS]
    wants = [hf_greedy(s, p, N_NEW) for p in prompts]
    assert any(hf_greedy(wide, p, N_NEW) != w for p, w in zip(prompts, wants))  # the window changes the output
    for mode in ("ar", "speculative"):
        dec = Decoder(s, GenerationConfig(mode=mode, block_size=4, max_new_tokens=N_NEW))
        assert [dec.generate(p).tokens for p in prompts] == wants
        assert [g.tokens for g in generate_batch(dec, prompts)] == wants  # batched, left-padded
    for p, want in zip(prompts, wants):  # drafts accepted in runs of every length: the cache is cropped
        for tree in (None, "3,2,1"):
            with monkeypatch.context() as m:
                use_oracle_drafts(s, m, p + want)
                g = Decoder(s, GenerationConfig(mode="speculative", block_size=4, max_new_tokens=N_NEW, tree=tree,
                                                draft_threshold=0.0)).generate(p)
            assert g.tokens == want
            assert g.forwards < g.new_tokens


def _caches(s, monkeypatch) -> list:
    """The caches the decoders of ``s`` make from here on."""
    made = []

    def new_cache(self):
        made.append(new(self))
        return made[-1]

    new = Decoder._new_cache
    monkeypatch.setattr(Decoder, "_new_cache", new_cache)
    return made


@pytest.mark.parametrize("arch", ["mistral", "gemma3", "llama4_text"])
@pytest.mark.parametrize("plain", [False, True])
def test_windowed_layers_keep_only_the_keys_a_query_can_still_see(arch, plain, monkeypatch):
    """Past the window, a sliding (chunked) layer's cache holds the last W keys (the current chunk) and this
    step's tokens, the full layers every key, in every mode, batched and with trees; the output stays
    ``generate``'s, with the decoder's own cache and with ``transformers``' (a GPU's)."""
    s = windowed(arch)
    n_new = 40
    prompts = [random_prompt(seed, n) for seed, n in PROMPTS]
    wants = [hf_greedy(s, p, n_new) for p in prompts]
    caches = _caches(s, monkeypatch)
    with plain_cache() if plain else contextlib.nullcontext():
        for mode, tree in (("ar", None), ("speculative", None), ("speculative", "3,2,1")):
            dec = Decoder(s, GenerationConfig(mode=mode, block_size=4, max_new_tokens=n_new, tree=tree,
                                              draft_threshold=0.0))
            for p, want in zip(prompts, wants):
                caches.clear()
                g = dec.generate(p)
                assert g.tokens == want, (mode, tree)
                held = {kind: {layer.keys.shape[-2] for layer, k in zip(caches[0].layers, s.cache_kinds) if k == kind}
                        for kind in set(s.cache_kinds)}
                for kind, w in s.windows.windows.items():
                    if w is None:  # every committed token but the last (the next step's first)
                        assert held[kind] == {len(p) + g.new_tokens - 1}
                    else:
                        assert max(held[kind]) <= W + 1 and max(held[kind]) < len(p) + g.new_tokens - 1
            sizes = []
            for kinds in (s.cache_kinds, None):  # batched: against the same decoding with every key kept
                caches.clear()
                monkeypatch.setattr(s, "cache_kinds", kinds)
                assert [g.tokens for g in generate_batch(dec, prompts)] == wants
                sizes.append([layer.keys.shape[-2] for layer in caches[0].layers])
            monkeypatch.undo()
            caches = _caches(s, monkeypatch)
            for (kept, full), kind in zip(zip(*sizes), s.cache_kinds):
                assert kept < full if s.windows.windows[kind] is not None else kept == full


@pytest.mark.parametrize("arch", ["mistral", "gemma3", "llama4_text"])
def test_a_batch_cache_compacted_at_every_step_still_gives_generate_s_output(arch, monkeypatch):
    """Compacting a batch's cache regathers every layer; a windowed layer gets zeros for the keys it had
    dropped (hidden by its window) and drops them again."""
    import sdlm.batched as batched

    monkeypatch.setattr(batched, "COMPACT_MIN", 1)
    monkeypatch.setattr(batched, "COMPACT_BELOW", 1.01)
    s = windowed(arch)
    prompts = [random_prompt(seed, n) for seed, n in [(100, 5), (101, 14), (102, 30), (103, 9)]]
    wants = [hf_greedy(s, p, 40) for p in prompts]
    for tree in (None, "3,2,1"):
        dec = Decoder(s, GenerationConfig(mode="speculative", block_size=4, max_new_tokens=40, tree=tree,
                                          draft_threshold=0.0))
        assert [g.tokens for g in generate_batch(dec, prompts)] == wants


def test_dropping_one_key_too_many_breaks_equality_with_generate(monkeypatch):
    """The teeth of the test above: a cache that drops the oldest key a query can still see no longer gives
    the model's output."""
    s = windowed("mistral")
    prompt = random_prompt(101, 14)
    want = hf_greedy(s, prompt, N_NEW)
    dec = Decoder(s, GenerationConfig(mode="speculative", block_size=4, max_new_tokens=N_NEW))
    assert dec.generate(prompt).tokens == want
    monkeypatch.setattr(Window, "unseen_before", lambda self, q: max(0, q - self.sliding + 2))
    assert dec.generate(prompt).tokens != want


def test_a_cache_whose_layers_are_not_one_per_layer_keeps_every_key(monkeypatch):
    """Gemma 3n's last layers read the keys of earlier ones: nothing is dropped, and the output is the model's."""
    s = SDLM(*random_model("gemma3n_text", sliding_window=W), None, name="windowed:gemma3n_text")
    s.retrofit(block_size=4)
    assert s.windows.smallest == W and s.cache_kinds is None
    prompt = random_prompt(101, 14)
    want = hf_greedy(s, prompt, N_NEW)
    assert hf_greedy(SDLM(*random_model("gemma3n_text"), None), prompt, N_NEW) != want  # the window matters here
    caches = _caches(s, monkeypatch)
    for mode in ("ar", "speculative"):
        dec = Decoder(s, GenerationConfig(mode=mode, block_size=4, max_new_tokens=N_NEW))
        assert dec.generate(prompt).tokens == want
        assert [g.tokens for g in generate_batch(dec, [prompt, random_prompt(100, 5)])][0] == want
    assert not any(getattr(c, "sdlm_trimmed", None) for c in caches)


@pytest.mark.parametrize("arch", ["mistral", "cohere2"])
def test_training_layout_equals_the_decoder_past_the_window(arch):
    """The same block, in the training layout (one dense forward, the model's window masks) and in a cached
    speculative step far past the window, gives the same logits; the clean tokens give the causal model's."""
    s = windowed(arch)
    x = random_prompt(7, 20)
    n, k, D = 16, 2, 4
    cache = DynamicCache()
    s.step_logits(ar_step(x[:12], 0), cache, 0)  # 12 clean tokens in the cache
    step = speculative_step(x[12:n], 12, x[n : n + k], D, s.config.mask_token_id)
    got = s.step_logits(step, cache, 12)
    with torch.no_grad():
        plain = s.model(torch.tensor([x[: n + k]])).logits[0]
    torch.testing.assert_close(got[: k + 1], plain[n - 1 : n + k], atol=1e-4, rtol=0)
    lay = training_layout(torch.tensor(x[: n + k]), torch.ones(n + k, dtype=torch.bool), list(range(n - 1, n + k)),
                          D, s.config.mask_token_id)
    mask = s.masks(allowed(lay.info, lay.info), lay.info.pos, lay.info.pos)
    assert isinstance(mask, dict) == (arch == "cohere2")
    with torch.no_grad():
        train = s.forward(lay.input_ids[None], lay.info.pos[None], mask, lay.info.is_block[None])[0]
    torch.testing.assert_close(train[: n + k], plain, atol=1e-4, rtol=0)
    torch.testing.assert_close(got[k + 1 :], train[n + k :], atol=1e-4, rtol=0)


def test_trainer_picks_dense_masks_for_samples_longer_than_a_window():
    s = windowed("cohere2", window=64)
    pick = lambda max_length, attention="auto": Trainer.attention.fget(  # noqa: E731
        SimpleNamespace(sdlm=s, cfg=SimpleNamespace(attention=attention, max_length=max_length, block_size=4,
                                                    retrofit="block-adapter")))
    assert pick(60) == "blocks" and pick(61) == "sdpa"  # the CPU default, until samples reach past the window
    assert pick(512, "gather") == "gather"  # asked for: the batch is refused if it reaches past the window


def _batch(s, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    lays: list[TrainingLayout] = []
    for n in lengths:
        ids = torch.randint(0, 250, (n,), generator=g)
        lm = torch.zeros(n, dtype=torch.bool)
        lm[3:] = True
        lays.append(training_layout(ids, lm, sample_block_starts(lm, 3, g), 4, s.config.mask_token_id))
    return pack(lays)


def test_fast_training_attention_refuses_samples_past_the_window_and_is_exact_within():
    s = windowed("cohere2", window=24)
    attach(s, AdapterConfig(kind="block-adapter", r=4))
    long, short = _batch(s, (30, 17)), _batch(s, (15, 12))
    ref_short, ref_long = dense_loss(s, short, 4).loss, two_pass_loss(s, long, 4).loss
    assert torch.allclose(ref_long, dense_loss(s, long, 4).loss, atol=1e-5)  # the dense masks apply the window
    for use in (use_block_attention, use_gathered_attention):
        use(s.model)
        with pytest.raises(SDLMError, match="attention: sdpa"):
            two_pass_loss(s, long, 4)
        assert torch.allclose(two_pass_loss(s, short, 4).loss, ref_short, atol=1e-5)


def test_one_forward_count_equals_the_decoder_past_the_window():
    s = windowed("cohere2")
    # its blocks are the training layout's (the model's window masks), and not those of the rule alone
    x, first, D = random_prompt(7, 20), 2, 4
    starts = list(range(first, len(x) - 1))
    lay = training_layout(torch.tensor(x), torch.ones(len(x), dtype=torch.bool), starts, D, s.config.mask_token_id)
    with torch.no_grad():
        train = s.forward(lay.input_ids[None], lay.info.pos[None],
                          s.masks(allowed(lay.info, lay.info), lay.info.pos, lay.info.pos), lay.info.is_block[None])[0]
    train = train[len(x) :].view(len(starts), D, -1)
    train[..., s.config.mask_token_id] = float("-inf")
    assert torch.equal(block_drafts(s, x, first, D), train.argmax(-1))
    windows, s.windows = s.windows, FULL
    assert not torch.equal(block_drafts(s, x, first, D), train.argmax(-1))
    s.windows = windows
    for seed, n in PROMPTS:
        prompt = random_prompt(seed, n)
        dec = Decoder(s, GenerationConfig(mode="speculative", block_size=4, max_new_tokens=N_NEW, draft_threshold=0.0))
        g = dec.generate(prompt)
        t = tokens_per_forward(s, prompt, g.tokens, 4, max_new_tokens=N_NEW, draft_threshold=0.0)
        assert (t.new_tokens, t.forwards) == (g.new_tokens, g.forwards)
        assert t.offered == [st.proposed for st in list(dec.stream(prompt))[1:]]


@pytest.mark.parametrize("arch, settings, reason", [
    ("lfm2", {"layer_types": ["conv", "full_attention"]}, r"recurrent state \(conv layers\)"),
    ("mamba", {"state_size": 8}, "recurrent state"),
    ("bloom", {}, "ALiBi"),
    ("gpt_neo", {"attention_types": [[["global", "local"], 1]], "window_size": 6}, "window by place in the forward"),
    ("doge", {}, "routing mixes"),
    ("deepseek_v32", {"kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
                      "v_head_dim": 16, "head_dim": 8, "num_key_value_heads": 4},  # a learned key selection
     r"(indexed_attention|deepseek_sparse_attention) layers: SDLM runs models whose layers are all full"),
    ("roberta", {"is_decoder": True}, "encoder or encoder-decoder"),  # ar was right there, speculative was not
    ("bart", {}, "encoder or encoder-decoder"),
    ("marian", {"decoder_layers": 2, "decoder_attention_heads": 4}, "encoder or encoder-decoder"),
    ("trocr", {"decoder_layers": 2, "decoder_attention_heads": 4, "d_model": 64},  # batched and trees went wrong
     "takes no position ids"),
    ("openai-gpt", {"n_layer": 2, "n_head": 4, "n_embd": 64}, "takes no KV cache"),
    ("dory", {}, "runs its recurrent layers 2 times per forward"),  # it crashed inside its attention
])
def test_models_sdlm_cannot_run_exactly_are_refused(arch, settings, reason):
    if arch not in CONFIG_MAPPING:
        pytest.skip(f"this transformers has no {arch}")
    model, tok = random_model(arch, attn="eager", **settings)
    with pytest.raises(SDLMError, match=reason):
        SDLM(model, tok, None)


def test_a_model_that_ignores_its_position_ids_is_refused(monkeypatch):
    model, tok = random_model("llama")
    SDLM(model, tok, None)  # takes them
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, position_ids=None, **k: forward(*a, **k))  # counts them itself
    with pytest.raises(SDLMError, match="ignores the position ids it is given"):
        SDLM(model, tok, None)
