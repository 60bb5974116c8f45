"""The fused LoRA layers of the training step (sdlm.train.fused) against peft's own layers."""

import pytest
import torch

from sdlm.train.fused import fuse_lora_linears
from sdlm.train.loss import dense_loss, two_pass_loss

from test_train import adapted, batch


def _grads(ad):
    return [p.grad.clone() for p in ad.lora_parameters().values()] + [ad.mask_embedding.grad.clone()]


def _run(s, ad, fn, b, autocast):
    for p in ad.parameters():
        p.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = fn(s, b, 4)
    out.loss.backward()
    return out.loss.detach(), _grads(ad)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_lora_gives_peft_losses_and_gradients(arch):
    """The two-pass loss with the fused layers equals the one through peft's layers (and the dense
    reference): loss and gradients of every LoRA weight and of the mask embedding (float32; qwen2's
    projections have biases). The block pass never runs peft's LoRA branch."""
    s, ad = adapted(arch)
    ad.train_mask_embedding()
    ad.mask_embedding.requires_grad_(True)
    b = batch(s)
    ref_loss, ref_grads = _run(s, ad, dense_loss, b, False)
    peft_loss, peft_grads = _run(s, ad, two_pass_loss, b, False)
    assert fuse_lora_linears(s) == len(ad._layers) > 0  # in place: the same weights, fused layers
    calls = []
    for m in ad._layers:
        m.lora_B["default"].register_forward_hook(lambda *a: calls.append(1))
    fused_loss, fused_grads = _run(s, ad, two_pass_loss, b, False)
    assert not calls
    assert torch.allclose(fused_loss, peft_loss, atol=1e-5) and torch.allclose(peft_loss, ref_loss, atol=1e-5)
    for x, y, r in zip(fused_grads, peft_grads, ref_grads):
        assert (x - y).norm() <= 1e-5 * y.norm() and (y - r).norm() <= 1e-5 * r.norm() and y.norm() > 0


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_lora_layer_under_bf16_autocast(arch):
    """Under bf16 autocast, with and without a bf16 weight copy, a fused layer's output and the gradients
    of its input and LoRA weights are peft's up to bf16 rounding (one layer: a whole random model in bf16
    is too chaotic to compare), and the output is bf16 as peft's is."""
    from sdlm.train.fused import lora_linear

    s, ad = adapted(arch)
    biased = [m for m in ad._layers if m.base_layer.bias is not None]
    layers = [ad._layers[0]] + biased[:1]
    assert (arch == "qwen2") == bool(biased)
    s.gate = True
    g = torch.Generator().manual_seed(1)
    for layer in layers:
        x0 = torch.randn(2, 7, layer.base_layer.in_features, generator=g)
        w = torch.randn(2, 7, layer.base_layer.out_features, generator=g)
        results = []
        for fn in (layer, lambda x: lora_linear(layer, x),
                   lambda x: lora_linear(layer, x, layer.base_layer.weight.detach().bfloat16())):
            x = x0.clone().requires_grad_(True)
            for p in ad.lora_parameters().values():
                p.grad = None
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = fn(x)
            (y.float() * w).sum().backward()
            A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            results.append((y.float(), x.grad, A.grad.clone(), B.grad.clone(), y.dtype))
        for other in results[1:]:
            assert other[4] == results[0][4] == torch.bfloat16
            for a, b in zip(other[:4], results[0][:4]):
                assert (a - b).norm() <= 1e-2 * b.norm() and b.norm() > 0
    s.gate = None


def test_fused_lora_leaves_other_calls_to_peft():
    """With a per-token gate, without gradients, or with the adapter off, a fused layer gives peft's output."""
    s, ad = adapted("llama")
    fuse_lora_linears(s)
    layer = ad._layers[0]
    x = torch.randn(1, 5, layer.base_layer.in_features)
    gate = torch.tensor([[0, 1, 0, 1, 1]], dtype=torch.bool)
    s.gate = gate
    gated = layer(x)
    base = layer.base_layer(x)
    assert torch.allclose(gated[0, 0], base[0, 0]) and not torch.allclose(gated[0, 1], base[0, 1])
    s.gate = True
    with torch.no_grad():
        on = layer(x)
    with torch.enable_grad():
        fused_on = layer(x)
    assert torch.allclose(on, fused_on, atol=1e-5) and torch.allclose(on[0, 1], gated[0, 1], atol=1e-5)
    ad.set_active(False)
    assert torch.allclose(layer(x), base)
    s.gate = None


def test_trainer_fused_lora_default_and_same_steps(tmp_path):
    """On CPU the trainer fuses the block-adapter's LoRA layers by default; ``fused_lora: false`` keeps
    peft's layers. Both train the same steps (losses and adapter weights)."""
    import sdlm.train.fused as fused
    from sdlm.train.trainer import Trainer

    from test_train import tiny

    runs = {}
    for on in (None, False):
        calls = []
        real = fused.lora_linear
        fused.lora_linear = lambda *a, **k: calls.append(1) or real(*a, **k)
        try:
            tr = Trainer(tiny(tmp_path / str(on), retrofit="block-adapter", steps=3, save_every=0, eval_every=0,
                              fused_lora=on))
            runs[on] = ([tr.train_step()["loss"] for _ in range(3)],
                        {k: v.clone() for k, v in tr.adapter.state_dict().items()})
        finally:
            fused.lora_linear = real
        assert bool(calls) == (on is None)
    assert runs[None][0] == pytest.approx(runs[False][0], abs=1e-5)
    for k, w in runs[None][1].items():
        assert torch.allclose(w, runs[False][1][k], atol=1e-5), k


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_rms_norms_in_a_bf16_base(arch):
    """Every RMS norm of the model is routed; with the base in bf16 a routed norm's output is within a
    rounding of the module's own and its input gradient close to it, float32 calls still run the module's
    own forward (bit for bit), and the two-pass loss and gradients barely move."""
    from sdlm.train.fused import fuse_rms_norms
    from sdlm.train.trainer import FrozenBF16

    s, ad = adapted(arch)
    ad.train_mask_embedding()
    ad.mask_embedding.requires_grad_(True)
    norms = [m for m in s.model.modules() if type(m).__name__.endswith("RMSNorm")]
    own = {m: m.forward for m in norms}
    b = batch(s)
    fb = FrozenBF16(s.model)
    with fb:
        ref_loss, ref_grads = _run(s, ad, two_pass_loss, b, True)
    assert fuse_rms_norms(s.model) == len(norms) > 0
    with fb:
        loss, grads = _run(s, ad, two_pass_loss, b, True)
        g = torch.Generator().manual_seed(1)
        for m in norms[:3]:
            x = (torch.randn(5, m.weight.shape[0], generator=g) * 4).bfloat16().requires_grad_(True)
            y = m(x)
            up = torch.randn(y.shape, generator=g).bfloat16()
            y.backward(up)
            x2 = x.detach().clone().requires_grad_(True)
            y2 = own[m](x2)
            y2.backward(up)
            assert y.dtype == y2.dtype == torch.bfloat16
            assert torch.allclose(y.float(), y2.float(), rtol=2**-7, atol=1e-3)
            assert torch.allclose(x.grad.float(), x2.grad.float(), rtol=2e-2, atol=2e-2 * float(x2.grad.abs().max()))
    x = torch.randn(5, norms[0].weight.shape[0])
    assert torch.equal(norms[0](x), own[norms[0]](x))  # float32: the module's own forward
    assert torch.allclose(loss, ref_loss, rtol=1e-2)
    for u, v in zip(grads, ref_grads):
        assert torch.nn.functional.cosine_similarity(u.flatten(), v.flatten(), dim=0) > 0.98


def test_fused_rms_norms_leave_other_norms_alone():
    """Norms of another form (Gemma's ``(1 + w)``, LayerNorm) or with a trained weight are not routed."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from sdlm.train.fused import fuse_rms_norms

    mods = torch.nn.ModuleList([GemmaRMSNorm(32), torch.nn.LayerNorm(32, bias=False), torch.nn.LayerNorm(32),
                                LlamaRMSNorm(32), LlamaRMSNorm(32)])
    with torch.no_grad():
        for m in mods:
            m.weight.add_(torch.randn(32) * 0.3)
    for m in mods[:-1]:
        m.weight.requires_grad_(False)
    assert fuse_rms_norms(mods) == 1  # the frozen Llama norm only
    assert "forward" in vars(mods[3]) and all("forward" not in vars(m) for i, m in enumerate(mods) if i != 3)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_rope_fusion_in_the_step_only(arch):
    """Inside ``rope_fusion``'s context the model's rotary embeddings run through the fused function: the
    same two-pass loss and gradients as the model's own in float32, and in a bf16 base at least as close to
    the float32 ones as the model's own; outside it (decoding, every other forward) the model's own
    function is back in place."""
    import sys

    from sdlm.train.fused import _Rope, rope_fusion
    from sdlm.train.trainer import FrozenBF16

    s, ad = adapted(arch)
    ad.train_mask_embedding()
    ad.mask_embedding.requires_grad_(True)
    mod = sys.modules[type(next(m for m in s.model.modules() if hasattr(m, "layer_idx"))).__module__]
    own = mod.apply_rotary_pos_emb
    ctx = rope_fusion(s.model)
    assert ctx is not None
    b = batch(s)
    calls = []
    real = _Rope.apply
    _Rope.apply = lambda *a: calls.append(1) or real(*a)
    try:
        ref_loss, ref_grads = _run(s, ad, two_pass_loss, b, False)
        assert not calls
        with ctx():
            assert mod.apply_rotary_pos_emb is not own
            loss, grads = _run(s, ad, two_pass_loss, b, False)
        assert calls and mod.apply_rotary_pos_emb is own
        assert torch.allclose(loss, ref_loss, atol=1e-5)
        for u, v in zip(grads, ref_grads):  # float32 rounding (one rounding where the composed form has two)
            assert (u - v).abs().max() <= 1e-4 * v.abs().max()
        fb = FrozenBF16(s.model)
        with fb:
            ref16, g16 = _run(s, ad, two_pass_loss, b, True)
            with ctx():
                loss16, grads16 = _run(s, ad, two_pass_loss, b, True)
    finally:
        _Rope.apply = real
    # in a bf16 base, the fused rotation (one rounding per element where the composed form has three) is
    # at least as close to the float32 step as the model's own: this small random model amplifies rounding
    cos = lambda u, v: float(torch.nn.functional.cosine_similarity(u.flatten(), v.flatten(), dim=0))  # noqa: E731
    assert abs(float(loss16 - ref_loss)) <= abs(float(ref16 - ref_loss)) + 1e-3
    for u, v, w in zip(grads16, g16, ref_grads):
        assert cos(u, w) >= cos(v, w) - 0.02


def test_rope_fusion_leaves_other_forms_alone():
    """A rotary embedding of another form (here the interleaved pairs of GPT-J style models) fails the
    check, so a model whose layers use it gets no fusion."""
    from sdlm.train.fused import _same_rope

    def interleaved(q, k, cos, sin, unsqueeze_dim=1):
        def rot(x):
            return torch.stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2)
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return q * cos + rot(q) * sin, k * cos + rot(k) * sin

    import transformers.models.llama.modeling_llama as llama

    assert _same_rope(llama.apply_rotary_pos_emb) and not _same_rope(interleaved)
    assert not _same_rope(lambda q, k, cos, sin: (q, k))


def _can_pack_bf16():
    from sdlm.cpu import can_prepack

    return can_prepack(torch.bfloat16, "cpu")


@pytest.mark.skipif(not _can_pack_bf16(), reason="this CPU or PyTorch build cannot pack bf16 weights for oneDNN")
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_frozen_linears_in_a_bf16_base(arch):
    """Inside ``FrozenBF16``, the frozen linear layers at least ``MIN_FEATURES`` wide get packed copies of
    their bf16 weights: a call without gradients gives ``F.linear``'s output within rounding through the
    packed copy, a call whose input needs a gradient and any float32 call outside run the layer's own
    forward (bit for bit); the fused LoRA layers use the copies forward and backward, and the two-pass loss
    and gradients barely move (qwen2's projections have biases)."""
    import torch.nn.functional as F

    import sdlm.train.fused as fused
    from sdlm.cpu import MIN_FEATURES
    from sdlm.train.trainer import FrozenBF16

    s, ad = adapted(arch)
    ad.train_mask_embedding()
    ad.mask_embedding.requires_grad_(True)
    b = batch(s)
    fb = FrozenBF16(s.model)
    fuse_lora_linears(s)
    with fb:
        ref_loss, ref_grads = _run(s, ad, two_pass_loss, b, True)
    tied = {id(s.model.get_input_embeddings().weight)}
    want = [m for m in s.model.modules() if type(m) is torch.nn.Linear and not m.weight.requires_grad
            and min(m.weight.shape) >= MIN_FEATURES and id(m.weight) not in tied]
    assert fused.pack_frozen_linears(s.model, fb.low_of) == len(want) > 0
    assert not any(hasattr(m, "_sdlm_bf16_packed") for m in s.model.modules()
                   if type(m) is torch.nn.Linear and m not in want)  # narrower ones (k, v here) run as before
    used = []
    real = fused._packed_linear
    fused._packed_linear = lambda x, w, bias: used.append(w) or real(x, w, bias)
    try:
        with fb:
            loss, grads = _run(s, ad, two_pass_loss, b, True)
    finally:
        fused._packed_linear = real
    copies = [m._sdlm_bf16_packed for m in want if m is not s.model.get_output_embeddings()]
    assert {id(p.weight) for p in copies} <= {id(w) for w in used}  # the clean pass and the fused forwards
    assert any(id(w) in {id(p.weight_t) for p in copies} for w in used)  # the fused layers' backward
    assert torch.allclose(loss, ref_loss, rtol=1e-2)
    for u, v in zip(grads, ref_grads):
        assert torch.nn.functional.cosine_similarity(u.flatten(), v.flatten(), dim=0) > 0.98
    lin = want[0]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, lin.weight.shape[1], generator=g)
    with fb:
        xb = x.bfloat16()
        with torch.no_grad():
            y = lin(xb)
        ref = F.linear(xb, lin.weight, lin.bias)
        assert y.shape == ref.shape and y.dtype == torch.bfloat16
        assert torch.allclose(y.float(), ref.float(), rtol=2**-7, atol=2**-7 * float(ref.abs().max()))
        xg = xb.clone().requires_grad_(True)
        yg = lin(xg)
        assert torch.equal(yg, ref)  # the layer's own forward, with its gradient
        yg.sum().backward()
        assert xg.grad is not None
    assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))  # float32 outside: its own forward


@pytest.mark.skipif(not _can_pack_bf16(), reason="this CPU or PyTorch build cannot pack bf16 weights for oneDNN")
def test_packed_copies_are_checked():
    """A packed copy that does not give the layer's products (here, the weight packed where its transpose
    belongs) is refused, so the layer is left alone."""
    from sdlm.cpu import _pack
    from sdlm.train.fused import Packed, _packed_agrees

    g = torch.Generator().manual_seed(0)
    for shape in ((64, 64), (128, 64)):
        low = torch.randn(shape, generator=g).bfloat16()
        assert _packed_agrees(low, None, Packed(low, _pack(low), _pack(low.t().contiguous())))
        assert not _packed_agrees(low, None, Packed(low, _pack(low), _pack(low)))
        assert not _packed_agrees(low, None, Packed(low, _pack(low.t().contiguous()), _pack(low.t().contiguous())))


@pytest.mark.skipif(not _can_pack_bf16(), reason="this CPU or PyTorch build cannot pack bf16 weights for oneDNN")
def test_packed_copies_need_room(monkeypatch, caplog):
    """Where the packed copies would take more than half the memory still available, no layer is packed
    and a warning says so; the layers run their own forward."""
    import sdlm.cpu as cpu
    import sdlm.train.fused as fused
    from sdlm.train.trainer import FrozenBF16

    s, _ = adapted()
    fb = FrozenBF16(s.model)
    monkeypatch.setattr(cpu, "available_memory", lambda: 1 << 16)
    with caplog.at_level("WARNING"):
        assert fused.pack_frozen_linears(s.model, fb.low_of) == 0
    assert "not packing" in caplog.text
    assert not any(hasattr(m, "_sdlm_bf16_packed") for m in s.model.modules())
    monkeypatch.setattr(cpu, "available_memory", lambda: None)  # unknown: packed
    assert fused.pack_frozen_linears(s.model, fb.low_of) > 0
