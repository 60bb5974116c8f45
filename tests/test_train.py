"""Training: loss paths agree, the gated adapter keeps the base model exact, recipes run and resume."""

import json
from pathlib import Path

import pytest
import torch

from sdlm.adapter import AdapterConfig, attach, cpu_lora_in_low_precision, plain_lora_layers, unfused_lora
from sdlm.decode import Decoder, GenerationConfig
from sdlm.layout import sample_block_starts, training_layout
from sdlm.model import SDLM
from sdlm.train.loss import dense_loss, pack, two_pass_loss
from sdlm.train.trainer import TrainConfig, Trainer
from sdlm.zoo import random_model

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"


def adapted(arch="llama", kind="block-adapter", seed=0, alpha=32.0):
    model, tok = random_model(arch)
    s = SDLM(model, tok, None)
    s.retrofit(block_size=4)
    ad = attach(s, AdapterConfig(kind=kind, r=4, alpha=alpha))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a non-zero adapter, so that the gate has something to switch off
        for p in ad.lora_parameters().values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        ad.mask_embedding.copy_(torch.randn(ad.mask_embedding.shape, generator=g))
    ad.write_mask_embedding()
    return s, ad


def loss_and_grads(s, ad, fn, batch, **kw):
    """``fn(s, batch, 4, **kw)`` (a loss of block size 4) and the LoRA gradients of its backward pass."""
    for p in ad.lora_parameters().values():
        p.grad = None
    o = fn(s, batch, 4, **kw)
    o.loss.backward()
    return o, [p.grad.clone() for p in ad.lora_parameters().values()]


def batch(s, D=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    lays = []
    for L in (17, 30, 24):
        ids = torch.randint(0, 250, (L,), generator=g)
        lm = torch.zeros(L, dtype=torch.bool)
        lm[6:] = True
        lays.append(training_layout(ids, lm, sample_block_starts(lm, 6, g), D, s.config.mask_token_id))
    return pack(lays)


def test_two_pass_equals_dense_loss_and_grads():
    s, ad = adapted()
    b = batch(s)
    d = dense_loss(s, b, 4)
    d.loss.backward()
    gd = [p.grad.clone() for p in ad.lora_parameters().values()]
    for p in ad.lora_parameters().values():
        p.grad = None
    t = two_pass_loss(s, b, 4)
    t.loss.backward()
    gt = [p.grad.clone() for p in ad.lora_parameters().values()]
    assert torch.allclose(d.loss, t.loss, atol=1e-5)
    assert torch.equal(d.slot_count, t.slot_count) and torch.equal(d.slot_correct, t.slot_correct)
    for a, b_ in zip(gd, gt):
        assert torch.allclose(a, b_, atol=1e-5)


def test_slot_weights_weight_the_block_loss():
    """slot_weights: a weighted mean over targets, the same in the dense and the two-pass step."""
    from sdlm.errors import SDLMError

    s, ad = adapted()
    b = batch(s)
    plain = dense_loss(s, b, 4)
    assert torch.allclose(dense_loss(s, b, 4, slot_weights=[2.0, 2.0, 2.0, 2.0]).loss, plain.loss, atol=1e-6)
    only0 = dense_loss(s, b, 4, slot_weights=[1.0, 0.0, 0.0, 0.0])
    assert torch.allclose(only0.loss, plain.slot_loss_sum[0] / plain.slot_count[0], atol=1e-5)
    w = [1.0, 0.5, 0.25, 0.125]
    by_slot = plain.slot_loss_sum / plain.slot_count * plain.slot_count * torch.tensor(w)
    ref = by_slot.sum() / (plain.slot_count * torch.tensor(w)).sum()
    grads = []
    for fn in (dense_loss, two_pass_loss):
        for p in ad.lora_parameters().values():
            p.grad = None
        out = fn(s, b, 4, slot_weights=w) if fn is dense_loss else fn(s, b, 4, 0.0, w)
        out.loss.backward()
        assert torch.allclose(out.loss, ref, atol=1e-5)
        assert torch.allclose(out.block_loss, plain.block_loss, atol=1e-5)  # reported CE stays the plain mean
        grads.append([p.grad.clone() for p in ad.lora_parameters().values()])
    for a, b_ in zip(*grads):
        assert torch.allclose(a, b_, atol=1e-5)
    for bad in ([1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, -1.0, 1.0, 1.0], "high"):
        with pytest.raises(SDLMError, match="slot_weights"):
            TrainConfig(model="m", data="d.jsonl", block_size=4, slot_weights=bad)


def test_padding_does_not_change_the_loss():
    """A sample's loss is the same alone and padded inside a batch."""
    s, _ = adapted()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 250, (20,), generator=g)
    lm = torch.ones(20, dtype=torch.bool)
    lay = training_layout(ids, lm, [2, 7, 11], 4, s.config.mask_token_id)
    longer = training_layout(torch.randint(0, 250, (35,), generator=g), torch.ones(35, dtype=torch.bool), [1, 4, 9, 20, 30], 4, s.config.mask_token_id)
    alone = dense_loss(s, pack([lay]), 4)
    both = dense_loss(s, pack([lay, longer]), 4)
    sep = dense_loss(s, pack([longer]), 4)
    n1, n2 = alone.n_block_targets, sep.n_block_targets
    assert torch.allclose(both.loss, (alone.loss * n1 + sep.loss * n2) / (n1 + n2), atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("D", [2, 4])
def test_gated_adapter_keeps_base_output(arch, D):
    """With a (non-zero) block adapter loaded, ar and speculative still give the bare base's generate."""
    base, _ = random_model(arch)
    s, _ = adapted(arch)
    prompt = [5, 17, 99, 3, 42, 42, 8]
    ref = base.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=20, attention_mask=torch.ones(1, 7, dtype=torch.long))[0, 7:].tolist()
    for mode in ("ar", "speculative"):
        for use_cache in (True, False):
            got = Decoder(s, GenerationConfig(mode=mode, block_size=D, max_new_tokens=20, use_cache=use_cache)).generate(prompt)
            assert got.tokens == ref, (mode, use_cache)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("alpha", [8.0, 6.0])  # LoRA scaling 2 (a power of two) and 1.5
def test_fused_gated_inference_gives_peft_outputs(arch, alpha):
    """The gated LoRA layers' short inference path (sdlm.adapter.fuse_gated_inference) runs instead of
    peft's modules, and gives peft's outputs: exactly the base model's where the gate is 0, the same
    block outputs within rounding where it is 1, for a per-token gate (batch of 2) and an all-block pass."""
    s, ad = adapted(arch, alpha=alpha)
    calls = []
    for mod in s.model.modules():
        if type(mod).__name__ == "ModuleDict" and "default" in mod and isinstance(mod["default"], torch.nn.Linear):
            mod["default"].register_forward_hook(lambda *a: calls.append(1))  # peft's lora_A / lora_B modules
    ids = torch.tensor([[5, 17, 99, 3, 42, 42, 8, 11, 4, 9], [7, 1, 2, 3, 4, 5, 6, 7, 8, 9]])
    pos = torch.arange(10).expand(2, 10)
    gate = torch.zeros(2, 10, dtype=torch.bool)
    gate[:, 5:] = True
    gate[1, 7] = False
    with torch.no_grad():
        fused, fused_all = s.forward(ids, pos, None, gate), s.forward(ids, pos, None, True)
        assert not calls  # the peft modules did not run
        with unfused_lora():
            ref, ref_all = s.forward(ids, pos, None, gate), s.forward(ids, pos, None, True)
        assert calls
        base = s.forward(ids, pos, None, torch.zeros_like(gate))  # no block token: the adapter is off
    assert torch.equal(fused[:, :5], ref[:, :5]) and torch.equal(fused[:, :5], base[:, :5])  # before any block token
    assert torch.allclose(fused, ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(fused_all, ref_all, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(fused[:, 5:], base[:, 5:], atol=1e-3)  # the adapter does act at block tokens
    with torch.no_grad():  # a gate tensor changed in place between forwards is read afresh
        g = gate.clone()
        s.forward(ids, pos, None, g)
        g[:, :5], g[:, 5:] = True, False
        again = s.forward(ids, pos, None, g)
        with unfused_lora():
            expect = s.forward(ids, pos, None, g)
    assert torch.allclose(again, expect, atol=1e-5, rtol=1e-5)


def test_bf16_lora_products_run_in_float32_on_a_cpu():
    """In a bf16 model on a CPU the fused layers' LoRA products run in float32 (on float32 copies of the LoRA
    weights, made again when a weight changes): clean tokens still get exactly the base model's output, and
    block tokens are closer to the float32 model's than ``peft``'s bf16 products get them."""
    s, ad = adapted("llama")
    ids = torch.tensor([[5, 17, 99, 3, 42, 42, 8, 11, 4, 9]])
    pos = torch.arange(10)[None]
    gate = torch.zeros(1, 10, dtype=torch.bool)
    gate[:, 4:] = True
    with torch.no_grad():
        want = s.forward(ids, pos, None, gate).float()
        s.model.to(torch.bfloat16)
        got = s.forward(ids, pos, None, gate)
        with cpu_lora_in_low_precision():
            low = s.forward(ids, pos, None, gate)
        with unfused_lora():
            ref = s.forward(ids, pos, None, gate)
        base = s.forward(ids, pos, None, torch.zeros_like(gate))
    layers = [mod for mod, _ in plain_lora_layers(s.model)]
    assert all(set(mod.__dict__.get("_sdlm_fp32_lora", {})) == {"lora_A", "lora_B"} for mod in layers)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got[:, :4], base[:, :4]) and torch.equal(ref[:, :4], base[:, :4])
    assert torch.allclose(low, ref, atol=0.05, rtol=0.02)  # the bf16 route is peft's, up to summation order
    err = lambda x: (x[:, 4:].float() - want[:, 4:]).abs().mean().item()  # noqa: E731
    assert err(got) < err(ref)
    with torch.no_grad():  # a LoRA weight changed in place: its float32 copy is made again
        layers[0].lora_B["default"].weight.mul_(3)
        changed = s.forward(ids, pos, None, gate)
        with unfused_lora():
            expect = s.forward(ids, pos, None, gate)
    gap = lambda x, y: (x.float() - y.float()).abs().mean().item()  # noqa: E731
    assert gap(changed, expect) < gap(changed, got) / 4


@pytest.mark.parametrize("prepack", [False, True])
def test_forwards_without_block_tokens_run_the_base_layers_alone(prepack):
    """A forward with no block token (an ``ar`` step, a prefill, a plain call without a gate) runs each gated
    LoRA layer's base layer directly, not through ``peft``'s forward, and gives the bare base model's output."""
    s, ad = adapted("llama")
    if prepack:
        s.prepack()
    peft_calls = []
    for mod, _ in plain_lora_layers(s.model):
        real = mod._check_forward_args  # the first thing peft's LoRA forward does
        mod._check_forward_args = lambda *a, real=real, **k: peft_calls.append(1) or real(*a, **k)
    base, _ = random_model("llama")
    ids = torch.tensor([[5, 17, 99, 3, 42, 42, 8, 11]])
    pos = torch.arange(8)[None]
    with torch.no_grad():
        want = base(ids).logits
        got = s.forward(ids, pos, None, torch.zeros(1, 8, dtype=torch.bool))
        plain = s.model(ids).logits  # no gate set: the adapter is off
    assert not peft_calls
    V = want.shape[-1]  # the adapted model has one more token: the mask
    got, plain = got[..., :V], plain[..., :V]
    assert torch.allclose(got, want, atol=1e-5) and torch.allclose(plain, want, atol=1e-5)
    with torch.no_grad():
        s.forward(ids, pos, None, torch.ones(1, 8, dtype=torch.bool))
        with unfused_lora():
            s.forward(ids, pos, None, torch.zeros(1, 8, dtype=torch.bool))
    assert len(peft_calls) == len(list(plain_lora_layers(s.model)))  # the unfused forward only, once per layer


def test_vouched_forwards_still_run_forward_hooks_on_base_layers():
    """In a plain inference forward a gated layer runs its base layer's packed product without the module
    call, except where that layer has forward hooks: they run, and the output is unchanged."""
    s, ad = adapted("llama")
    assert s.prepack() > 0
    mod, _ = next(iter(plain_lora_layers(s.model)))
    assert hasattr(mod.base_layer, "_sdlm_packed_state")
    ids = torch.tensor([[5, 17, 99, 3, 42, 42, 8, 11]])
    pos = torch.arange(8)[None]
    gate = torch.zeros(1, 8, dtype=torch.bool)
    gate[:, 4:] = True
    with torch.inference_mode():
        want = [s.forward(ids, pos, None, g) for g in (gate, torch.zeros_like(gate))]
        seen = []
        handle = mod.base_layer.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        got = [s.forward(ids, pos, None, g) for g in (gate, torch.zeros_like(gate))]
        handle.remove()
    assert len(seen) == 2  # once per forward, gated and not
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_ungated_lora_changes_the_model():
    """The control: the same adapter without the gate does change the AR output."""
    base, _ = random_model("llama")
    s, _ = adapted(kind="lora")
    prompt = [5, 17, 99, 3, 42, 42, 8]
    ref = base.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=20, attention_mask=torch.ones(1, 7, dtype=torch.long))[0, 7:].tolist()
    got = Decoder(s, GenerationConfig(mode="ar", max_new_tokens=20)).generate(prompt)
    assert got.tokens != ref


def tiny(tmp_path, **over):
    base = {"out_dir": str(tmp_path / "run"), "steps": 12, "save_every": 4, "eval_every": 6, "heldout": 8, "samples_per_step": 4}
    base.update(over)
    return TrainConfig.from_yaml(RECIPE, base)


def final_state(path: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.mark.parametrize("retrofit", ["full", "block-adapter"])
def test_killed_run_resumes_to_the_same_end(tmp_path, retrofit, caplog):
    straight = Trainer(tiny(tmp_path / "a", retrofit=retrofit))
    summary = straight.run(progress=False)
    # "killed" after step 8: a run that stopped at its step-8 checkpoint, then the full run again
    first = Trainer(tiny(tmp_path / "b", retrofit=retrofit, steps=12))
    first.cfg.steps = 8
    first.run(progress=False)
    resumed = Trainer(tiny(tmp_path / "b", retrofit=retrofit, steps=12))
    with caplog.at_level("WARNING", logger="sdlm.train.trainer"):
        out = resumed.run(progress=False)
    assert "resuming from the checkpoint" in caplog.text and "at step 8 of 12" in caplog.text  # said by default
    assert resumed.step == 12 and out["steps_run"] == 4  # the summary's speed covers the steps this call ran
    a, b = final_state(tmp_path / "a" / "run" / "final"), final_state(tmp_path / "b" / "run" / "final")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    rows = [json.loads(l) for l in (tmp_path / "a" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_slot_acc" in r for r in rows) and rows[-1]["step"] == 12
    steps = [r for r in rows if "loss" in r]
    assert all(r["sample_tokens_per_s"] > 0 and r["block_tokens_per_s"] > 0 for r in steps)
    assert (tmp_path / "a" / "run" / "metrics.png").is_file()
    import statistics

    assert summary["steps_run"] == 12 and summary["step"] == 12 and isinstance(summary["bf16"], bool)
    assert summary["median_block_tokens_per_s"] == pytest.approx(statistics.median(r["block_tokens_per_s"] for r in steps), abs=0.06)
    assert summary["median_sample_tokens_per_s"] == pytest.approx(statistics.median(r["sample_tokens_per_s"] for r in steps), abs=0.06)


def test_a_cpu_without_bf16_trains_in_float32_and_says_so(tmp_path, monkeypatch, caplog):
    import sdlm.train.trainer as trainer_mod

    monkeypatch.setattr(trainer_mod, "_bf16_supported", lambda device: False)
    with caplog.at_level("WARNING", logger=trainer_mod.__name__):
        tr = Trainer(tiny(tmp_path, steps=1, save_every=0, eval_every=0, bf16=None))  # the recipe leaves it to the CPU
    assert not tr.bf16 and any("no native bf16" in r.getMessage() for r in caplog.records)
    assert tr.run(progress=False)["bf16"] is False
    caplog.clear()
    with caplog.at_level("WARNING", logger=trainer_mod.__name__):
        tr = Trainer(tiny(tmp_path / "chosen", steps=1, bf16=False))  # the recipe's own choice: no warning
    assert not tr.bf16 and not any("bf16" in r.getMessage() for r in caplog.records)
    with caplog.at_level("WARNING", logger=trainer_mod.__name__):
        tr = Trainer(tiny(tmp_path / "forced", steps=1, bf16=True))  # asked for: done, with the cost named
    assert tr.bf16 and any("emulated" in r.getMessage() for r in caplog.records)


def test_tiny_recipe_learns_and_decodes(tmp_path):
    """The tiny recipe end to end: loss falls, the result loads, lossless decoding stays AR-exact."""
    tr = Trainer(tiny(tmp_path, steps=60, eval_every=0, save_every=0, samples_per_step=16, lr=3e-3, schedule="constant"))
    tr.run(progress=False)
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"] * 0.6
    s = SDLM.load(str(tmp_path / "run" / "final"))
    assert s.config.block_size == 4 and s.config.retrofit == "full"
    prompt = s.tokenizer("xyz xyz xyz")["input_ids"]
    ar = Decoder(s, GenerationConfig(mode="ar", max_new_tokens=24)).generate(prompt)
    sp = Decoder(s, GenerationConfig(mode="speculative", max_new_tokens=24)).generate(prompt)
    assert sp.tokens == ar.tokens
    assert sp.forwards <= ar.forwards


def test_recipe_errors(tmp_path):
    from sdlm.errors import SDLMError

    bad = tmp_path / "r.yaml"
    bad.write_text("model: random:llama\ndata: x.jsonl\nlearning_rate: 1\n")
    with pytest.raises(SDLMError, match="unknown keys"):
        TrainConfig.from_yaml(bad)
    with pytest.raises(SDLMError, match="not found"):
        TrainConfig.from_yaml(tmp_path / "missing.yaml")
    with pytest.raises(SDLMError, match="retrofit"):
        TrainConfig.from_yaml(RECIPE, {"retrofit": "magic"})
    with pytest.raises(SDLMError, match="fsdp shards the weights of retrofit: full"):
        TrainConfig.from_yaml(RECIPE, {"retrofit": "block-adapter", "fsdp": True})
    with pytest.raises(SDLMError, match="fsdp with compile"):
        TrainConfig.from_yaml(RECIPE, {"retrofit": "full", "fsdp": True, "compile": True})


def test_schedule_over_time_decays_by_whichever_ends_first():
    from sdlm.errors import SDLMError
    from sdlm.train.trainer import lr_factor

    cfg = TrainConfig(model="m", data="d.jsonl", schedule="linear", warmup_steps=0, steps=100)
    assert lr_factor(cfg, 50, seconds=590) == pytest.approx(0.5)  # by steps: time is ignored
    cfg = TrainConfig(model="m", data="d.jsonl", schedule="linear", warmup_steps=0, steps=100,
                      schedule_over="time", time_limit_minutes=10)
    assert lr_factor(cfg, 10, seconds=450) == pytest.approx(0.25)  # time ends it first
    assert lr_factor(cfg, 80, seconds=60) == pytest.approx(0.2)  # steps end it first
    assert lr_factor(cfg, 10, seconds=600) == 0.0
    with pytest.raises(SDLMError, match="time_limit_minutes"):
        TrainConfig(model="m", data="d.jsonl", schedule_over="time")


def test_data_list_and_gzip_read_as_one_file(tmp_path):
    """`data:` as a list of files, one gzip-compressed, gives the samples of their concatenation."""
    import gzip

    from sdlm.errors import SDLMError

    src = (Path(RECIPE).parent / "data" / "patterns.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "a.jsonl").write_text("".join(src[:100]))
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write("".join(src[100:]))
    (tmp_path / "all.jsonl").write_text("".join(src))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(Path(RECIPE).read_text().replace("data: data/patterns.jsonl", "data: [a.jsonl, b.jsonl.gz]"))
    split = Trainer(TrainConfig.from_yaml(recipe, {"out_dir": str(tmp_path / "x")}))
    assert split.cfg.data == [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl.gz")]  # read next to the recipe
    whole = Trainer(TrainConfig.from_yaml(RECIPE, {"out_dir": str(tmp_path / "y"), "data": str(tmp_path / "all.jsonl")}))
    assert [e.ids.tolist() for e in split.train] == [e.ids.tolist() for e in whole.train]
    assert len(split.train) + len(split.heldout) == len(src)
    with pytest.raises(SDLMError, match="list of paths"):
        TrainConfig.from_yaml(RECIPE, {"data": ["a.jsonl", 3]})


def _layouts(s, lengths=(17, 30, 24, 9), seed=0, D=4):
    g = torch.Generator().manual_seed(seed)
    lays = []
    for L in lengths:
        ids = torch.randint(0, 250, (L,), generator=g)
        lm = torch.zeros(L, dtype=torch.bool)
        lm[4:] = True
        lays.append(training_layout(ids, lm, sample_block_starts(lm, 5, g), D, s.config.mask_token_id))
    return lays


def test_row_packing_keeps_loss_and_grads():
    """Several samples per row (kept apart by seq) give the one-sample-per-row loss and gradients."""
    s, ad = adapted()
    lays = _layouts(s)
    from sdlm.train.loss import assign_rows

    rows = assign_rows(lays, 70)
    assert len(rows) < len(lays) and sorted(i for r in rows for i in r) == list(range(len(lays)))
    outs = []
    for b in (pack(lays), pack(lays, row_tokens=70)):
        for p in ad.lora_parameters().values():
            p.grad = None
        o = two_pass_loss(s, b, 4)
        o.loss.backward()
        outs.append((o, [p.grad.clone() for p in ad.lora_parameters().values()], b))
    (a, ga, ba), (b_, gb, bb) = outs
    assert bb.input_ids.shape[0] < ba.input_ids.shape[0]
    assert torch.allclose(a.loss, b_.loss, atol=1e-5) and torch.equal(a.slot_correct, b_.slot_correct)
    for x, y in zip(ga, gb):
        assert torch.allclose(x, y, atol=1e-5)
    assert torch.allclose(dense_loss(s, bb, 4).loss, b_.loss, atol=1e-5)


def test_teacher_columns_and_soft_targets():
    """Soft targets are the base model's own next-token distribution at the matching clean token."""
    import torch.nn.functional as F

    from sdlm.layout import IGNORE
    from sdlm.masks import additive, allowed
    from sdlm.train.loss import assign_rows

    s, ad = adapted()
    lays = _layouts(s)
    b = pack(lays, row_tokens=70)
    tgt = torch.nonzero(b.block_labels != IGNORE)
    for r, c in tgt.tolist():
        tc = int(b.teacher_col[r, c])
        assert 0 <= tc < b.n_clean and b.info.seq[r, tc] == b.info.seq[r, c] and b.info.pos[r, tc] == b.info.pos[r, c]
        assert b.input_ids[r, tc + 1] == b.block_labels[r, c]  # the clean token's next token is the slot's target
    # reference: student logits from the dense view, teacher from a plain base forward of each sample
    rows = assign_rows(lays, 70)
    mask = additive(allowed(b.info, b.info), s.dtype)
    with torch.no_grad():
        student = s.forward(b.input_ids, b.info.pos, mask, b.info.is_block)
        plain = [s.model(lay.input_ids[: lay.n_clean][None]).logits[0] for lay in lays]  # no gate: adapter off
    ce = []
    for r, c in tgt.tolist():
        lay = rows[r][int(b.info.seq[r, c])]
        teacher = torch.softmax(plain[lay][int(b.info.pos[r, c])], -1)
        ce.append(F.cross_entropy(student[r, c][None], teacher[None]))
    with torch.no_grad():
        got = two_pass_loss(s, b, 4, distill=1.0)
        mixed = two_pass_loss(s, b, 4, distill=0.25)
    ref = torch.stack(ce).mean()
    assert torch.allclose(got.loss, ref, atol=1e-4)
    assert torch.allclose(mixed.loss, 0.75 * mixed.block_loss + 0.25 * ref, atol=1e-4)


def test_bf16_export_and_init_adapter(tmp_path):
    """A bf16 export halves the file and loads; init_adapter starts a new run from it."""
    from safetensors.torch import load_file

    tr = Trainer(tiny(tmp_path / "a", retrofit="block-adapter", steps=4, save_every=0, eval_every=0, export_dtype="bfloat16"))
    tr.run(progress=False)
    w = load_file(str(tmp_path / "a" / "run" / "final" / "adapter.safetensors"))
    assert all(v.dtype == torch.bfloat16 for v in w.values())
    s = SDLM.load(str(tmp_path / "a" / "run" / "final"))
    assert s.adapter is not None and s.model.dtype == torch.float32
    nxt = Trainer(tiny(tmp_path / "b", retrofit="block-adapter", steps=0, init_adapter=str(tmp_path / "a" / "run" / "final")))
    got = nxt.adapter.state_dict()
    assert got.keys() == w.keys()
    assert all(torch.equal(got[k], w[k].float()) for k in w)
    with pytest.raises(Exception, match="not an adapter folder"):
        Trainer(tiny(tmp_path / "c", retrofit="block-adapter", init_adapter=str(tmp_path)))


@pytest.mark.parametrize("slot_weights", [None, [1.0, 0.7, 0.4, 0.2]])
@pytest.mark.parametrize("distill", [0.0, 0.5])
def test_samples_run_apart_give_the_packed_loss_and_grads(slot_weights, distill):
    """Each sample as its own forward (``norm`` = the batch's) sums to the packed batch's loss and gradients.

    A one-sample batch also takes the fast path (no clean mask, logits exactly at the targets): it must
    equal the dense reference."""
    from sdlm.train.loss import _plain_causal, loss_norm
    from sdlm.train.trainer import _combine

    s, ad = adapted()
    lays = _layouts(s)

    def run(parts, norm):
        for p in ad.lora_parameters().values():
            p.grad = None
        outs = []
        for part in parts:
            o = two_pass_loss(s, pack(part), 4, distill, slot_weights, norm)
            o.loss.backward()
            outs.append(o)
        return _combine(outs), [p.grad.clone() for p in ad.lora_parameters().values()]

    whole, g_whole = run([lays], None)
    apart, g_apart = run([[lay] for lay in lays], loss_norm(lays, slot_weights))
    assert torch.allclose(whole.loss, apart.loss, atol=1e-5)
    assert torch.allclose(whole.block_loss, apart.block_loss, atol=1e-5)
    assert torch.equal(whole.slot_count, apart.slot_count) and torch.equal(whole.slot_correct, apart.slot_correct)
    assert whole.n_block_targets == apart.n_block_targets
    for x, y in zip(g_whole, g_apart):
        assert torch.allclose(x, y, atol=1e-5)
    one = pack([lays[0]])
    assert _plain_causal(one.columns(torch.arange(one.n_clean)).info)
    assert not _plain_causal(pack(lays[:2], row_tokens=10_000).info)  # two samples in a row: masked
    if distill == 0.0:
        fast, ref = two_pass_loss(s, one, 4, 0.0, slot_weights), dense_loss(s, one, 4, slot_weights=slot_weights)
        assert torch.allclose(fast.loss, ref.loss, atol=1e-5)


def test_trainer_split_samples_matches_packed(tmp_path):
    """``split_samples`` is an execution choice: the same steps, losses and weights either way."""
    runs = {}
    for split in (False, True):
        tr = Trainer(tiny(tmp_path / str(split), retrofit="block-adapter", steps=3, save_every=0, eval_every=0,
                          split_samples=split))
        assert tr.split_samples is split
        recs = [tr.train_step() for _ in range(3)]
        runs[split] = ([r["loss"] for r in recs], [r["block_tokens"] for r in recs],
                       {k: v.clone() for k, v in tr.adapter.state_dict().items()})
    (la, na, wa), (lb, nb, wb) = runs[False], runs[True]
    assert na == nb and la == pytest.approx(lb, abs=1e-5)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k
    assert not Trainer(tiny(tmp_path / "d", retrofit="block-adapter")).split_samples  # default: one row
    from sdlm.errors import SDLMError

    for key in ("split_samples", "bf16_weights", "train_mask_embedding", "compile"):
        with pytest.raises(SDLMError, match=f"{key}.*true or false"):
            tiny(tmp_path / "f", **{key: "maybe"})
    assert not Trainer(tiny(tmp_path / "e", retrofit="full", split_samples=True)).split_samples  # dense path only


def test_compiled_regions_give_the_same_steps(tmp_path):
    """``compile: true`` compiles the repeated parts of every decoder layer (never the attention, whose
    cache update reads the layer index) and trains the same steps as eager, packed and split."""
    import torch._dynamo

    from sdlm.train.trainer import decoder_layers

    runs = {}
    for split in (False, True):
        for comp in (False, True):
            torch._dynamo.reset()
            tr = Trainer(tiny(tmp_path / f"{split}{comp}", retrofit="block-adapter", steps=3, save_every=0,
                              eval_every=0, split_samples=split, compile=comp))
            layers = decoder_layers(tr.sdlm.model)
            assert len(layers) == tr.sdlm.model.config.num_hidden_layers
            compiled = [m for m in layers.modules() if getattr(m, "_compiled_call_impl", None) is not None]
            attn = [m for m in layers.modules() if hasattr(m, "layer_idx")]
            assert (len(compiled) > 0) is comp and not any(a in compiled for a in attn)
            recs = [tr.train_step() for _ in range(3)]
            runs[split, comp] = ([r["loss"] for r in recs], {k: v.clone() for k, v in tr.adapter.state_dict().items()})
    for split in (False, True):
        (la, wa), (lb, wb) = runs[split, False], runs[split, True]
        assert la == pytest.approx(lb, abs=1e-4)
        for k in wa:
            assert torch.allclose(wa[k], wb[k], atol=1e-4), k
    torch._dynamo.reset()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_flex_attention_gives_the_same_losses(arch, monkeypatch, tmp_path):
    """With flex attention registered, both loss paths run their masks as flex block masks and give the
    sdpa losses and metrics; decoding (dense and no masks) still runs through sdpa, unchanged. The
    trainer refuses flex off CUDA, where PyTorch has no flex backward."""
    import sdlm.model as model_mod
    from sdlm.errors import SDLMError
    from sdlm.model import use_flex_attention

    s, ad = adapted(arch)
    b = batch(s)
    dec = Decoder(s, GenerationConfig(mode="speculative", max_new_tokens=12, block_size=4))
    prompt = [5, 17, 33, 8]
    with torch.no_grad():
        ref = [fn(s, b, 4) for fn in (dense_loss, two_pass_loss)]
        out_ref = dec.generate(prompt)
        use_flex_attention(s.model)
        calls = []
        real = model_mod._flex
        monkeypatch.setattr(model_mod, "_flex", lambda dev: calls.append(dev) or real(dev))
        flex = [fn(s, b, 4) for fn in (dense_loss, two_pass_loss)]
        n_layers = s.model.config.num_hidden_layers
        assert len(calls) == 3 * n_layers  # dense: one forward; two-pass: clean and block forwards
        for r, f in zip(ref, flex):
            assert torch.allclose(r.loss, f.loss, atol=1e-5)
            assert torch.equal(r.slot_correct, f.slot_correct) and torch.equal(r.slot_count, f.slot_count)
        calls.clear()
        out = dec.generate(prompt)
        assert out.tokens == out_ref.tokens and not calls
    with pytest.raises(SDLMError, match="flex trains on CUDA only"):
        Trainer(tiny(tmp_path / "a", retrofit="block-adapter", attention="flex"))
    with pytest.raises(SDLMError, match="unknown attention"):
        tiny(tmp_path / "b", attention="dense")


@pytest.mark.parametrize("workers", [1, 2])
def test_prep_workers_give_the_same_run(tmp_path, workers):
    """Batches laid out ahead by prep worker processes are the ones the step lays out itself: the same
    losses step by step and the same final weights, also when the step size changes mid-run (the
    workers start again from the current step) and across a resume."""
    from sdlm.errors import SDLMError

    def losses(tr, steps, sizes=(4,)):
        out = []
        for i in range(steps):
            tr.cfg.samples_per_step = sizes[i % len(sizes)]
            rec = tr.train_step()
            out.append((rec["step"], rec["loss"], rec["block_tokens"]))
        return out

    here = Trainer(tiny(tmp_path / "here", retrofit="block-adapter", save_every=0, eval_every=0, prep_workers=0))
    ahead = Trainer(tiny(tmp_path / "ahead", retrofit="block-adapter", save_every=0, eval_every=0,
                         prep_workers=workers))
    assert ahead.prep_workers == workers
    a, b = losses(here, 5, sizes=(4, 4, 3)), losses(ahead, 5, sizes=(4, 4, 3))
    assert [r[0] for r in b] == [1, 2, 3, 4, 5] and [r[2] for r in a] == [r[2] for r in b]
    assert [r[1] for r in a] == pytest.approx([r[1] for r in b], rel=1e-6, abs=1e-7)
    for (name, p), (_, q) in zip(here.sdlm.model.named_parameters(), ahead.sdlm.model.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6), name
    # a resumed run's workers start at the resumed step
    ahead.step = 2
    assert losses(ahead, 1)[0][0] == 3 and ahead._loader_next == (3, 4)
    with pytest.raises(SDLMError, match="prep_workers must be"):
        tiny(tmp_path / "bad", prep_workers=-1)


def test_out_of_memory_in_a_step_names_the_fix(tmp_path, monkeypatch):
    """A step that runs out of device memory fails with an error naming the settings that shrink it."""
    from sdlm.errors import SDLMError

    tr = Trainer(tiny(tmp_path / "oom", retrofit="block-adapter", attention="sdpa", save_every=0, eval_every=0))

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 16.00 GiB.\nmore text")

    monkeypatch.setattr(tr, "_micro_loss", oom)
    with pytest.raises(SDLMError, match=r"step of 4 samples in 1 micro-batch.*Tried to allocate 16.00 GiB.*raise "
                                        r"grad_accum.*attention: gather or flex"):
        tr.train_step()
    assert tr.step == 0


def test_sdpa_backend_restricts_the_step_kernel(tmp_path):
    """``sdpa_backend`` runs the step's sdpa calls on the kernel named (seen in the profiler's operators),
    with the same loss as PyTorch's own choice; CUDA-only kernels are refused on a CPU recipe."""
    from torch.profiler import ProfilerActivity, profile

    from sdlm.errors import SDLMError

    def step_ops(tr):
        gen = torch.Generator().manual_seed(3)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = tr.loss(tr.train[:4], gen)
        return out.loss.item(), {e.key for e in prof.key_averages()}

    losses = {}
    for backend in ("auto", "pytorch", "math"):
        tr = Trainer(tiny(tmp_path / backend, retrofit="block-adapter", attention="sdpa", sdpa_backend=backend,
                          bf16=False))
        losses[backend], ops = step_ops(tr)
        math_ran = "aten::_scaled_dot_product_attention_math" in ops
        flash_ran = any(op.startswith("aten::_scaled_dot_product_flash_attention") for op in ops)
        assert (math_ran, flash_ran) == ((True, False) if backend == "math" else (False, True)), ops
    assert losses["math"] == pytest.approx(losses["auto"], rel=1e-5) and losses["pytorch"] == losses["auto"]
    # auto on CUDA: flash, then memory-efficient attention before cuDNN; the order is restored after
    from torch.nn.attention import SDPBackend

    from sdlm.train.trainer import sdpa_context

    before = torch._C._get_sdp_priority_order()
    with sdpa_context("auto", "cuda"):
        order = torch._C._get_sdp_priority_order()
    want = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]
    assert order[:4] == [b.value for b in want] and torch._C._get_sdp_priority_order() == before
    for bad in ("efficient", "cudnn"):
        with pytest.raises(SDLMError, match=f"sdpa_backend: {bad} runs on CUDA only"):
            tiny(tmp_path / bad, sdpa_backend=bad)
    with pytest.raises(SDLMError, match="unknown sdpa_backend"):
        tiny(tmp_path / "x", sdpa_backend="fast")


def test_clean_attention_setting_reaches_the_step(tmp_path, monkeypatch):
    """``clean_attention`` picks how the one-row clean pass runs (``chunks`` or ``sdpa``, counted), with the
    same loss both ways; an unknown value is refused with the choices."""
    import sdlm.attention as attention_mod
    from sdlm.errors import SDLMError

    ran, losses = [], {}
    for name, kernel in (("causal_segments_attention", "chunks"), ("causal_segments_sdpa", "sdpa")):
        real = getattr(attention_mod, name)
        monkeypatch.setattr(attention_mod, name, lambda *a, real=real, kernel=kernel, **k: ran.append(kernel)
                            or real(*a, **k))
    for kernel in ("chunks", "sdpa"):
        tr = Trainer(tiny(tmp_path / kernel, retrofit="block-adapter", attention="blocks", clean_attention=kernel,
                          bf16=False))
        ran.clear()
        losses[kernel] = tr.loss(tr.train[:4], torch.Generator().manual_seed(3)).loss.item()
        assert ran and set(ran) == {kernel}
    assert losses["sdpa"] == pytest.approx(losses["chunks"], rel=1e-5)
    with pytest.raises(SDLMError, match="unknown clean_attention 'flash': use one of auto, chunks, sdpa"):
        tiny(tmp_path / "x", clean_attention="flash")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("chunk", [None, 1, 7, 1000])
def test_fused_head_and_loss_give_the_reference_loss_and_grads(arch, chunk):
    """The two-pass step applies the LM head and the loss together (``linear_ce``), all targets at once
    or in chunks: the same loss, per-slot metrics and gradients as the dense reference, which takes
    the full logits through ``F.cross_entropy``, with and without slot weights."""
    s, ad = adapted(arch)
    b = batch(s)
    for w in (None, [1.0, 0.8, 0.6, 0.4]):
        res = []
        for fn in (lambda: dense_loss(s, b, 4, slot_weights=w), lambda: two_pass_loss(s, b, 4, slot_weights=w, chunk=chunk)):
            for p in ad.lora_parameters().values():
                p.grad = None
            o = fn()
            o.loss.backward()
            res.append((o, [p.grad.clone() for p in ad.lora_parameters().values()]))
        (a, ga), (c_, gc) = res
        assert torch.allclose(a.loss, c_.loss, atol=1e-5) and torch.allclose(a.block_loss, c_.block_loss, atol=1e-5)
        assert torch.equal(a.slot_correct, c_.slot_correct) and torch.equal(a.slot_count, c_.slot_count)
        assert torch.allclose(a.slot_loss_sum, c_.slot_loss_sum, atol=1e-4)
        for x, y in zip(ga, gc):
            assert torch.allclose(x, y, atol=1e-5)
    from sdlm.errors import SDLMError

    with pytest.raises(SDLMError, match="hard-label"):
        two_pass_loss(s, b, 4, distill=0.5, chunk=chunk or 8)


@pytest.mark.parametrize("multiple", [1, 16])
@pytest.mark.parametrize("rows", [None, 2, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_ce_is_cross_entropy_of_the_head(bias, rows, multiple, monkeypatch):
    """``linear_ce`` against ``F.cross_entropy(head(h))``: per-target losses, top-1 hits and the gradient of
    any weighting of the losses, at every chunk size, and with the softmax taken a few rows of a chunk at a
    time (``rows``); without a gradient it computes none; under bf16 autocast it matches the autocast
    reference. With the head's 50 rows padded with zeros to a multiple of 16 (as to 64 on a GPU), the
    padding's logits take no part (their zeros in the softmax would change the losses)."""
    import torch.nn.functional as F

    from sdlm.train import loss as loss_mod
    from sdlm.train.loss import linear_ce

    if rows is not None:
        monkeypatch.setattr(loss_mod, "_softmax_rows", lambda device: rows)
    monkeypatch.setattr(loss_mod, "_row_multiple", lambda device: multiple)

    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=bias).requires_grad_(False)
    h0 = torch.randn(13, 8, generator=g) * 3
    y = torch.randint(0, 50, (13,), generator=g)
    y[3] = head(h0[3]).argmax()  # at least one hit
    w = torch.rand(13, generator=g)
    h = h0.clone().requires_grad_(True)
    logits = head(h)
    ref_ce = F.cross_entropy(logits, y, reduction="none")
    (ref_ce * w).sum().backward()
    ref_grad, ref_hits = h.grad.clone(), (logits.argmax(-1) == y).float()
    assert ref_hits.sum() >= 1
    for chunk in (1, 5, 13, 1000):
        h = h0.clone().requires_grad_(True)
        ce, hits = linear_ce(h, head, y, chunk)
        (ce * w).sum().backward()
        assert torch.allclose(ce, ref_ce, atol=1e-5) and torch.equal(hits, ref_hits)
        assert torch.allclose(h.grad, ref_grad, atol=1e-5)
    with torch.no_grad():
        ce, _ = linear_ce(h0, head, y, 4)
    assert torch.allclose(ce, ref_ce, atol=1e-5)
    padded = getattr(head, "_sdlm_cast", None)
    assert (padded is not None and padded[1].shape == (64, 8) and not padded[1][50:].any()) == (multiple > 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = h0.clone().requires_grad_(True)
        ref = F.cross_entropy(head(h).float(), y, reduction="none")
        (ref * w).sum().backward()
        g_ref = h.grad.clone()
        h = h0.clone().requires_grad_(True)
        ce, _ = linear_ce(h, head, y, 5)
        (ce * w).sum().backward()
    assert h.grad.dtype == torch.float32
    assert torch.allclose(ce, ref, atol=1e-4) and torch.allclose(h.grad, g_ref, atol=2e-2, rtol=2e-2)
    from sdlm.cpu import can_prepack

    if can_prepack(torch.bfloat16):  # the gradient product ran on a packed copy of the bf16 weight's transpose
        assert head._sdlm_packed_t[1] is not None
        packed_grad = h.grad.clone()
        monkeypatch.setattr(loss_mod, "_packed_transpose", lambda head, weight: None)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = h0.clone().requires_grad_(True)
            ce, _ = linear_ce(h, head, y, 5)
            (ce * w).sum().backward()
        assert torch.allclose(h.grad, packed_grad, atol=1e-3, rtol=1e-2)


def test_trainer_loss_chunk(tmp_path):
    from sdlm.errors import SDLMError

    runs = []
    for c in (None, 5):
        tr = Trainer(tiny(tmp_path / str(c), retrofit="block-adapter", steps=2, save_every=0, eval_every=0,
                          split_samples=False, loss_chunk=c))
        runs.append([tr.train_step()["loss"] for _ in range(2)])
    assert runs[0] == pytest.approx(runs[1], abs=1e-5)
    for bad, msg in (({"loss_chunk": 0}, ">= 1"), ({"loss_chunk": 8, "retrofit": "full"}, "block-adapter"),
                     ({"loss_chunk": 8, "retrofit": "block-adapter", "distill": 0.5}, "distill: 0")):
        with pytest.raises(SDLMError, match=msg):
            tiny(tmp_path / "bad", **bad)


def test_trainer_attention_and_bf16_copies_defaults(tmp_path):
    """``attention: auto`` runs block attention for the block-adapter on CPU, with a micro-batch as one row
    of samples (one forward, the same losses and weights as sdpa's padded rows and as samples run apart),
    and sdpa for the other retrofits; ``blocks`` needs the block-adapter. bf16 weight copies default on
    for CPUs under bf16 autocast."""
    from sdlm.attention import BLOCK_ATTENTION, GATHER_ATTENTION
    from sdlm.errors import SDLMError

    runs, forwards = {}, {}
    for name, over in (("auto", {}), ("sdpa", {"attention": "sdpa"}), ("split", {"split_samples": True}),
                       ("gather", {"attention": "gather", "gather_chunk": 8})):
        tr = Trainer(tiny(tmp_path / name, retrofit="block-adapter", steps=2, save_every=0, eval_every=0, **over))
        assert tr.attention == (name if name in ("sdpa", "gather") else "blocks")
        assert tr.split_samples == (name == "split")
        impl = {"sdpa": "sdpa", "gather": GATHER_ATTENTION}.get(name, BLOCK_ATTENTION)
        assert tr.sdlm.model.config._attn_implementation.endswith(impl)
        calls = []
        # a pre-hook: the clean pass of the one-row step ends inside the decoder, once its KV cache is full
        hook = tr.sdlm.model.get_decoder().register_forward_pre_hook(lambda m, a, k: calls.append(k["input_ids"].shape),
                                                                     with_kwargs=True)
        runs[name] = ([tr.train_step()["loss"] for _ in range(2)], {k: v.clone() for k, v in tr.adapter.state_dict().items()})
        hook.remove()
        forwards[name] = calls
    assert all(shape[0] == 1 for shape in forwards["auto"])  # one row per pass
    assert len(forwards["auto"]) == 2 * 2 and len(forwards["split"]) == 2 * 2 * tr.cfg.samples_per_step
    for name in ("sdpa", "split", "gather"):
        assert runs["auto"][0] == pytest.approx(runs[name][0], abs=1e-5)
        for k, w in runs["auto"][1].items():
            assert torch.allclose(w, runs[name][1][k], atol=1e-5), (name, k)
    tr = Trainer(tiny(tmp_path / "full", retrofit="full"))
    assert tr.attention == "sdpa" and tr.sdlm.model.config._attn_implementation != BLOCK_ATTENTION
    with pytest.raises(SDLMError, match="attention: blocks is for retrofit: block-adapter"):
        tiny(tmp_path / "lora", retrofit="lora", attention="blocks")
    with pytest.raises(SDLMError, match="attention: gather is for retrofit: block-adapter"):
        tiny(tmp_path / "lora", retrofit="lora", attention="gather")
    with pytest.raises(SDLMError, match="gather_chunk must be"):
        tiny(tmp_path / "chunk0", retrofit="block-adapter", attention="gather", gather_chunk=0)
    tr = Trainer(tiny(tmp_path / "bf16", retrofit="block-adapter", bf16=True))
    assert tr.bf16_base and not tr.bf16_weights  # a bf16 base needs no copies
    assert tr.prep_workers == 0  # on CPUs the step lays out its own batches
    from sdlm.cpu import can_prepack

    assert tr.packed_base == can_prepack(torch.bfloat16, "cpu")  # its frozen layers packed where the CPU can
    assert not Trainer(tiny(tmp_path / "nopack", retrofit="block-adapter", bf16=True, packed_base=False)).packed_base
    # torch.compile cannot lower the packed products: with compile on they are off, and asking for both is an error
    assert not Trainer(tiny(tmp_path / "compiled", retrofit="block-adapter", bf16=True, compile=True)).packed_base
    with pytest.raises(SDLMError, match="packed_base with compile"):
        tiny(tmp_path / "both", retrofit="block-adapter", bf16=True, compile=True, packed_base=True)
    tr = Trainer(tiny(tmp_path / "bf16b", retrofit="block-adapter", bf16=True, bf16_base=False))
    assert tr.bf16_weights and not tr.bf16_base
    tr = Trainer(tiny(tmp_path / "bf16off", retrofit="block-adapter", bf16=True, bf16_base=False, bf16_weights=False))
    assert not tr.bf16_weights and not tr.bf16_base
    tr = Trainer(tiny(tmp_path / "fp32", retrofit="block-adapter"))  # the tiny recipe: bf16 off
    assert not tr.bf16_weights and not tr.bf16_base
    assert not Trainer(tiny(tmp_path / "fullbf16", retrofit="full", bf16=True)).bf16_base  # its base trains


def test_frozen_bf16_swaps_and_restores():
    """Inside ``FrozenBF16`` every frozen float32 parameter (a tied one once) is bf16 with autocast's
    rounding; outside, the very same float32 tensors are back, unchanged; trained ones are never touched."""
    from sdlm.train.trainer import FrozenBF16

    s, ad = adapted()
    frozen = {n: p for n, p in s.model.named_parameters() if not p.requires_grad}
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in frozen.items()}
    trained = {n: p.data_ptr() for n, p in s.model.named_parameters() if p.requires_grad}
    fb = FrozenBF16(s.model)
    assert len(fb) == len({id(p) for p in frozen.values()}) > 0
    with fb:
        with fb:  # nested: still bf16 inside
            pass
        for n, p in frozen.items():
            assert p.dtype == torch.bfloat16 and torch.equal(p.data, before[n][1].to(torch.bfloat16)), n
        for n, p in s.model.named_parameters():
            if p.requires_grad:
                assert p.data_ptr() == trained[n] and p.dtype == torch.float32
    for n, p in frozen.items():
        assert p.data_ptr() == before[n][0] and torch.equal(p.detach(), before[n][1]), n


@pytest.mark.parametrize("retrofit", ["block-adapter", "lora"])
def test_trainer_bf16_base_step(tmp_path, retrofit):
    """With ``bf16_base`` the step runs the frozen model in bf16 (its linear layers see bf16 weights and
    inputs) and gives nearly autocast's loss and update; between steps the float32 base is back, bit for bit."""
    runs = {}
    for on in (False, True):
        tr = Trainer(tiny(tmp_path / str(on), retrofit=retrofit, bf16=True, bf16_base=on, steps=2,
                          save_every=0, eval_every=0))
        assert tr.bf16_base == on
        base = {n: p.detach().clone() for n, p in tr.sdlm.model.named_parameters() if not p.requires_grad}
        start = {k: v.clone() for k, v in tr.adapter.state_dict().items()}
        seen = []
        lin = next(m for m in tr.sdlm.model.modules() if type(m) is torch.nn.Linear and not m.weight.requires_grad)
        hook = lin.register_forward_hook(lambda m, a, o: seen.append((m.weight.dtype, a[0].dtype)))
        losses = [tr.train_step()["loss"] for _ in range(2)]
        hook.remove()
        assert seen and all(w == (torch.bfloat16 if on else torch.float32) for w, _ in seen)
        if on:
            assert all(x == torch.bfloat16 for _, x in seen)  # the residual stream is bf16 too
        for n, p in tr.sdlm.model.named_parameters():
            if not p.requires_grad:
                assert p.dtype == torch.float32 and torch.equal(p, base[n]), n
        runs[on] = losses, {k: v - start[k] for k, v in tr.adapter.state_dict().items()}
    (la, da), (lb, db) = runs[False], runs[True]
    assert lb == pytest.approx(la, rel=0.02)
    assert la != lb  # not the same numbers: activations are rounded to bf16
    for k in da:
        cos = torch.nn.functional.cosine_similarity(da[k].flatten(), db[k].flatten(), dim=0)
        assert cos > 0.9, (k, float(cos))  # Adam updates: sign flips of tiny gradients weigh as much as the rest


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex attention trains on CUDA only")
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_flex_attention_gradients_on_cuda(arch):
    """On a GPU, flex attention gives the sdpa losses and gradients, both loss paths."""
    from sdlm.model import use_flex_attention

    s, ad = adapted(arch)
    s.model.to("cuda")
    b = batch(s)

    def run(fn):
        for p in ad.lora_parameters().values():
            p.grad = None
        o = fn(s, b, 4)
        o.loss.backward()
        return o.loss.detach(), [p.grad.clone() for p in ad.lora_parameters().values()]

    ref = [run(fn) for fn in (dense_loss, two_pass_loss)]
    use_flex_attention(s.model)
    flex = [run(fn) for fn in (dense_loss, two_pass_loss)]
    for (la, ga), (lb, gb) in zip(ref, flex):
        assert torch.allclose(la, lb, atol=1e-4)
        for x, y in zip(ga, gb):
            assert torch.allclose(x, y, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_bf16_weight_copies_change_nothing(arch):
    """Frozen linears with bf16 copies give bit-identical losses and gradients under bf16 autocast,
    and float32 results outside it; trained or tied weights get no copy."""
    from sdlm.train.trainer import shadow_bf16_linears

    s, ad = adapted(arch)
    b = batch(s)

    def run():
        for p in ad.lora_parameters().values():
            p.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            o = two_pass_loss(s, b, 4)
        o.loss.backward()
        return o.loss.detach(), [p.grad.clone() for p in ad.lora_parameters().values()]

    plain = run()
    with torch.no_grad():
        fp32 = dense_loss(s, b, 4).loss
    n = shadow_bf16_linears(s.model)
    lin = [m for m in s.model.modules() if type(m) is torch.nn.Linear]
    frozen = [m for m in lin if not any(p.requires_grad for p in m.parameters())]
    tied = s.model.get_output_embeddings().weight is s.model.get_input_embeddings().weight
    assert n == len(frozen) - (1 if tied else 0) and n > 0
    shadowed = run()
    assert torch.equal(plain[0], shadowed[0])
    for x, y in zip(plain[1], shadowed[1]):
        assert torch.equal(x, y)
    with torch.no_grad():
        assert torch.equal(dense_loss(s, b, 4).loss, fp32)  # outside autocast: the float32 weights
        m = next(m for m in frozen if m.weight is not s.model.get_output_embeddings().weight)
        x = torch.randn(3, m.in_features)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
        m.weight.mul_(2)  # inside autocast the layer reads its bf16 copy, outside the float32 weight
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(m(x), y)
        assert torch.equal(m(x), torch.nn.functional.linear(x, m.weight, m.bias)) and not torch.allclose(m(x), y.float(), atol=1e-2)


def test_padding_in_the_block_part_changes_nothing():
    """Rows whose block parts differ in length (padding after the shorter ones): the two-pass step, which
    gates the whole block part on, padding included, still equals the dense reference."""
    s, ad = adapted()
    g = torch.Generator().manual_seed(5)
    lays = []
    for L, n_blocks in ((26, 6), (22, 2), (15, 1)):
        ids = torch.randint(0, 250, (L,), generator=g)
        lm = torch.zeros(L, dtype=torch.bool)
        lm[5:] = True
        lays.append(training_layout(ids, lm, sample_block_starts(lm, n_blocks, g), 4, s.config.mask_token_id))
    b = pack(lays)
    assert int((b.info.seq[:, b.n_clean :] < 0).sum()) > 0  # there is padding in the block part
    res = []
    for fn in (dense_loss, two_pass_loss):
        for p in ad.lora_parameters().values():
            p.grad = None
        o = fn(s, b, 4)
        o.loss.backward()
        res.append((o, [p.grad.clone() for p in ad.lora_parameters().values()]))
    (d, gd), (t, gt) = res
    assert torch.allclose(d.loss, t.loss, atol=1e-5) and torch.equal(d.slot_correct, t.slot_correct)
    for x, y in zip(gd, gt):
        assert torch.allclose(x, y, atol=1e-5)


def test_train_profile_script(tmp_path):
    """bench/train_profile.py: the profiled report has the operator table (and with --shapes the one grouped
    by input shapes); --no-profiler times the steps alone; --flops adds the matrix-product count and
    floor; none writes checkpoints."""
    import re
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    base = [sys.executable, str(root / "bench" / "train_profile.py"), str(root / "recipes" / "tiny.yaml"),
            "--steps", "1", "--warmup", "0", "--rows", "3", "--set", "retrofit=block-adapter",
            "--set", f"out_dir={tmp_path / 'run'}"]
    prof = subprocess.run(base + ["--shapes", "--rows", "12", "--out", str(tmp_path / "prof.txt")],
                          capture_output=True, text=True, cwd=root)
    assert prof.returncode == 0, prof.stderr
    report = (tmp_path / "prof.txt").read_text()
    assert "1 profiled steps" in report and "profiler overhead included" in report
    # the operator table (which operators make its top rows depends on the CPU's timing: not asserted)
    assert "# of Calls" in report and "Self CPU time total" in report
    shapes = report.split("by input shapes, most self time first:")[1]
    assert "Input Shapes" in shapes and re.search(r"\[\[(\d+, )*\d+\]", shapes), shapes
    timed = subprocess.run(base + ["--no-profiler"], capture_output=True, text=True, cwd=root)
    assert timed.returncode == 0, timed.stderr
    assert "1 timed steps" in timed.stdout and "bf16 weight copies False" in timed.stdout
    assert "trained block tokens/s" in timed.stdout and "aten::" not in timed.stdout
    no_shapes = subprocess.run(base + ["--no-profiler", "--shapes"], capture_output=True, text=True, cwd=root)
    assert no_shapes.returncode == 2 and "--shapes needs the profiler" in no_shapes.stderr
    swept = subprocess.run(base + ["--no-profiler", "--sweep-samples", "2", "3"], capture_output=True, text=True, cwd=root)
    assert swept.returncode == 0, swept.stderr
    sizes = re.findall(r"attention blocks \(sdpa kernel auto, clean pass auto: (?:sdpa|chunks)\), fused LoRA True, "
                       r"(\d+) samples per step", swept.stdout)
    assert sizes == ["2", "3"] and swept.stdout.count("trained block tokens/s") == 2, swept.stdout
    phased = subprocess.run(base + ["--no-profiler", "--phases"], capture_output=True, text=True, cwd=root)
    assert phased.returncode == 0, phased.stderr
    phases = phased.stdout.split("; of these")[0]
    times = dict(re.findall(r"(clean pass\)|with gradients|loss|backward) (\d+\.\d+) s", phases))
    assert len(times) == 4 and all(float(v) > 0 for v in times.values()), phased.stdout
    attn = re.search(r"attention: clean pass (\d+\.\d+) s, block pass forward (\d+\.\d+) s, "
                     r"block pass backward (\d+\.\d+) s", phased.stdout)  # the CPU default: attention: blocks
    assert attn and all(float(v) > 0 for v in attn.groups()), phased.stdout
    assert sum(map(float, attn.groups())) < sum(map(float, times.values()))  # a share of the phases
    flops = subprocess.run(base + ["--no-profiler", "--flops"], capture_output=True, text=True, cwd=root)
    assert flops.returncode == 0, flops.stderr
    floor = re.search(r"matrix products: .*\(([\d.e+-]+) MFLOP per token, of which ([\d.e+-]+) in batched", flops.stdout)
    assert floor and float(floor.group(1)) > float(floor.group(2)) > 0  # the tiny recipe runs block attention
    assert not (tmp_path / "run").exists()


def test_train_profile_counts_packed_products():
    """--flops counts the products on oneDNN-packed weights (``packed_base``), which the flop counter does not
    know by itself: 2 x tokens x in x out, as for the same product on the plain weight."""
    import sys

    from torch.utils.flop_counter import FlopCounterMode

    from sdlm.cpu import _pack, _packed_linear, can_prepack

    if not can_prepack(torch.bfloat16, "cpu"):
        pytest.skip("this PyTorch build or CPU cannot pack bf16 weights")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from train_profile import packed_flop_mapping

    w = torch.randn(96, 64).to(torch.bfloat16)
    x = torch.randn(10, 64).to(torch.bfloat16)
    counter = FlopCounterMode(display=False, custom_mapping=packed_flop_mapping())
    with counter:
        _packed_linear(x, _pack(w), None)
    plain = FlopCounterMode(display=False)
    with plain:
        x @ w.t()
    counted = sum(counter.get_flop_counts().get("Global", {}).values())
    assert counted == 2 * 10 * 64 * 96 == sum(plain.get_flop_counts()["Global"].values())


def test_train_fixed_steps_script(tmp_path):
    """bench/train_fixed_steps.py: one line with a rate per repetition and their median, the settings the
    trainer resolved, nothing written; bad counts are refused."""
    import re
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, str(root / "bench" / "train_fixed_steps.py"), str(root / "recipes" / "tiny.yaml"),
           "--reps", "2", "--steps", "1", "--tag", "t", "--set", "retrofit=block-adapter",
           "--set", "samples_per_step=2", "--set", f"out_dir={tmp_path / 'run'}"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip().splitlines()[-1]
    assert line.startswith("t ") and "attention blocks" in line and "bf16 False" in line
    rates = [float(x) for x in re.search(r"repetition ([\d. ]+), median", line).group(1).split()]
    assert len(rates) == 2 and all(r > 0 for r in rates)
    assert not (tmp_path / "run").exists()
    bad = subprocess.run(cmd[:3] + ["--reps", "0"], capture_output=True, text=True, cwd=root)
    assert bad.returncode == 2 and "--reps" in bad.stderr


@pytest.mark.parametrize("attention", ["auto", "sdpa"])
def test_trainer_shares_a_common_prefix_with_the_same_results(tmp_path, attention, monkeypatch):
    """Chat samples that begin with the same system prompt: with ``share_prefix`` (the default) a
    micro-batch's row holds that prompt once, and training gives the losses and weights of rows that
    hold it in every sample (block attention's one row, and sdpa's packed rows)."""
    import sdlm.zoo as zoo
    from sdlm.masks import SHARED

    plain = zoo.byte_tokenizer

    def with_template():  # the random model's byte tokenizer has no chat template: give it one
        tok = plain()
        tok.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}<|eos|>{% endfor %}"
                             "{% if add_generation_prompt %}<assistant>{% endif %}")
        return tok

    monkeypatch.setattr(zoo, "byte_tokenizer", with_template)

    data = tmp_path / "chat.jsonl"
    g = torch.Generator().manual_seed(0)
    with open(data, "w") as f:
        for i in range(24):
            word = "".join(chr(97 + int(c)) for c in torch.randint(0, 26, (4,), generator=g))
            f.write(json.dumps({"messages": [
                {"role": "system", "content": "You answer with repeated words."},
                {"role": "user", "content": f"repeat {word}"},
                {"role": "assistant", "content": " ".join([word] * (3 + i % 4))}]}) + "\n")
    runs = {}
    for share in (True, False):
        tr = Trainer(tiny(tmp_path / str(share), retrofit="block-adapter", data=str(data), steps=2, save_every=0,
                          eval_every=0, heldout=0, attention=attention, share_prefix=share))
        batches, _ = tr.prep.prepare(tr.prep.samples(0, 4), torch.Generator().manual_seed(0))
        assert bool((batches[0].info.seq == SHARED).any()) == share
        runs[share] = ([tr.train_step()["loss"] for _ in range(2)],
                       {k: v.clone() for k, v in tr.adapter.state_dict().items()})
    assert runs[True][0] == pytest.approx(runs[False][0], abs=1e-5)
    for k, w in runs[True][1].items():
        assert torch.allclose(w, runs[False][1][k], atol=1e-5), k
