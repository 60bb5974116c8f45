"""Linear layers on oneDNN-packed weights for CPU inference (sdlm.cpu): the same products, used only
where they may be, and the same decoded tokens as ``transformers`` ``generate``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import hf_greedy, random_prompt
from sdlm.cpu import (PACK_HINT, can_prepack, checked_calls, exact_rows, in_plain_inference, packed_call, packed_layers,
                      packing_off, plain_inference, prepack_linears, unpack_linears)
from sdlm.decode import Decoder, GenerationConfig

pytestmark = pytest.mark.skipif(not can_prepack(torch.float32), reason="this PyTorch build has no oneDNN linear")

DTYPES = [torch.float32] + ([torch.bfloat16] if can_prepack(torch.bfloat16) else [])


def _layer(dtype, bias=True, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(96, 160, bias=bias).to(dtype).requires_grad_(False)


@pytest.fixture
def packed_calls(monkeypatch) -> list:
    """One entry per call that ran the packed product."""
    import sdlm.cpu as cpu

    calls, real = [], cpu._packed_linear
    monkeypatch.setattr(cpu, "_packed_linear", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_matches_f_linear(dtype, bias, packed_calls):
    lin = _layer(dtype, bias)
    assert prepack_linears(lin) == 1
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    inputs = [torch.randn(1, 96), torch.randn(5, 96), torch.randn(2, 37, 96), torch.randn(7, 300)[:, 100:196]]
    for x in inputs:
        x = x.to(dtype)
        with torch.inference_mode():
            got = lin(x)
        want = F.linear(x, lin.weight, lin.bias)
        assert got.shape == want.shape and got.dtype == dtype
        assert torch.allclose(got.float(), want.float(), rtol=tol, atol=tol * float(want.abs().max()))
    assert len(packed_calls) == len(inputs)  # every call above ran the packed product


@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_rows_runs_a_large_product_s_leading_rows_as_a_call_of_their_own(dtype, monkeypatch):
    """Under exact_rows(n), a product of one sequence's rows that holds more than PACK_HINT of them gives its
    first n rows the numbers of a call of those n alone (oneDNN's numbers for a row hold in calls of up to
    PACK_HINT rows only), and the rest those of a call of the rest; every other call is one product."""
    import sdlm.cpu as cpu

    packed_calls, real = [], cpu._onednn_linear  # one entry per oneDNN product
    monkeypatch.setattr(cpu, "_onednn_linear", lambda *a: packed_calls.append(1) or real(*a))
    lin = _layer(dtype)
    assert prepack_linears(lin) == 1
    g = torch.Generator().manual_seed(0)
    x = torch.randn(PACK_HINT + 8, 96, generator=g).to(dtype)
    with torch.inference_mode():
        alone = [lin(x[:5]), lin(x[5:])]
        whole = lin(x)
        packed_calls.clear()
        with exact_rows(5):
            got = lin(x)
            got3 = lin(x[None])  # (1, T, in): one sequence too
            assert len(packed_calls) == 4
            for other in (x[:PACK_HINT], torch.stack([x, x]), x[:, None]):  # few rows; two sequences; a row each
                packed_calls.clear()
                lin(other)
                assert len(packed_calls) == 1
        with exact_rows(PACK_HINT + 1):  # more leading rows than a call keeps exact: nothing to gain
            packed_calls.clear()
            assert torch.equal(lin(x), whole) and len(packed_calls) == 1
    assert torch.equal(got[:5], alone[0]) and torch.equal(got[5:], alone[1])
    assert torch.equal(got3[0], got)


def test_calls_that_need_the_layers_own_forward_get_it(packed_calls):
    lin = _layer(torch.float32)
    lin.weight.requires_grad_(True)
    prepack_linears(lin)
    x = torch.randn(4, 96, requires_grad=True)
    lin(x).square().sum().backward()  # gradients on: the module's own forward, with its autograd
    gx, gw = x.grad.clone(), lin.weight.grad.clone()
    x2 = x.detach().clone().requires_grad_(True)
    F.linear(x2, lin.weight, lin.bias).square().sum().backward()
    assert torch.equal(gx, x2.grad) and torch.allclose(gw, lin.weight.grad / 2)
    with torch.no_grad():
        lin(torch.randn(3, 96, dtype=torch.float64).float())  # no_grad: packed
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert lin(torch.randn(3, 96)).dtype == torch.bfloat16  # autocast: the module's own (autocast's) path
        with packing_off():
            lin(torch.randn(3, 96))
    assert len(packed_calls) == 1


def test_a_changed_weight_is_packed_again(packed_calls):
    lin = _layer(torch.float32)
    prepack_linears(lin)
    x = torch.randn(3, 96)
    with torch.no_grad():
        before = lin(x)
        lin.weight.mul_(2)  # in place (an optimizer step, load_state_dict)
        after = lin(x)
        lin.weight = torch.nn.Parameter(torch.randn(160, 96), requires_grad=False)  # a new tensor
        third = lin(x)
    assert torch.allclose(after, 2 * before - lin.bias, atol=1e-4)
    assert torch.allclose(third, F.linear(x, lin.weight, lin.bias), atol=1e-4)
    assert len(packed_calls) == 3


def test_a_weight_changed_by_a_fused_optimizer_is_packed_again(packed_calls):
    """AdamW's fused kernel updates a weight in place without bumping its version counter: the packed copy
    is made again after any optimizer step, not read stale."""
    lin = _layer(torch.float32)
    lin.weight.requires_grad_(True)
    prepack_linears(lin)
    x = torch.randn(3, 96)
    opt = torch.optim.AdamW([lin.weight], lr=0.1, fused=True)
    with torch.no_grad():
        before = lin(x)
    lin.weight.grad = torch.randn_like(lin.weight)
    old = lin.weight.detach().clone()
    opt.step()
    assert not torch.equal(lin.weight, old)
    with torch.no_grad():
        after = lin(x)
    assert torch.allclose(after, F.linear(x, lin.weight, lin.bias), atol=1e-5)
    assert not torch.allclose(after, before, atol=1e-3)
    assert len(packed_calls) == 2


def test_plain_inference_calls_skip_the_checks_and_give_the_same_numbers(packed_calls):
    """Inside ``plain_inference`` a routed layer runs the packed product without the module call's checks
    (``packed_call``), with the same numbers; what can change within a forward is still checked: a weight
    changed in place or replaced, an input of another dtype. Outside it, or under ``packing_off``,
    ``packed_call`` declines and the layer's own call decides."""
    lin = _layer(torch.float32)
    prepack_linears(lin)
    x = torch.randn(2, 5, 96)
    with torch.no_grad():
        want = lin(x)
        assert packed_call(lin, x) is None  # outside: the caller runs the layer
        with plain_inference():
            assert in_plain_inference()
            assert torch.equal(lin(x), want) and torch.equal(packed_call(lin, x), want)
            with packing_off():
                assert packed_call(lin, x) is None
            with plain_inference(False):
                assert packed_call(lin, x) is None
            assert packed_call(lin, x.double()) is None  # another dtype: the layer's own call
            lin.weight.mul_(2)  # in place: the stale packed copy must not be used
            assert packed_call(lin, x) is None
            assert torch.allclose(lin(x), F.linear(x, lin.weight, lin.bias), atol=1e-5)  # packed again
            assert torch.equal(packed_call(lin, x), lin(x))
            lin.weight = torch.nn.Parameter(torch.randn(160, 96), requires_grad=False)
            assert packed_call(lin, x) is None
            assert torch.allclose(lin(x), F.linear(x, lin.weight, lin.bias), atol=1e-5)
        assert not in_plain_inference()
    assert packed_calls and packed_call(torch.nn.Linear(96, 96), x) is None  # not routed


def test_sdlm_forwards_are_plain_inference_only_without_gradients_and_autocast(trained):
    """``SDLM.forward`` vouches for its calls (no gradients, no autocast, a CPU) only when that holds."""
    seen = []
    layer = trained.model.get_decoder().layers[0]
    handle = layer.register_forward_pre_hook(lambda *_: seen.append(in_plain_inference()))
    ids, pos = torch.tensor([[1, 2, 3]]), torch.arange(3)[None]
    gate = torch.zeros(1, 3, dtype=torch.bool)
    try:
        with torch.inference_mode():
            trained.forward(ids, pos, None, gate)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            trained.forward(ids, pos, None, gate)
        trained.forward(ids, pos, None, gate)  # gradients on
        with torch.inference_mode(), checked_calls():  # for comparisons: every call checks for itself
            trained.forward(ids, pos, None, gate)
    finally:
        handle.remove()
    assert seen == [True, False, False, False]
    assert not in_plain_inference()


def test_unpack_restores_the_layers():
    model = torch.nn.Sequential(_layer(torch.float32), torch.nn.ReLU(), torch.nn.Linear(160, 8))
    assert prepack_linears(model) == 1  # 160 -> 8 is narrower than the minimum: left alone
    assert prepack_linears(model) == 0  # already routed
    assert len(packed_layers(model)) == 1
    assert unpack_linears(model) == 1
    assert packed_layers(model) == [] and "forward" not in model[0].__dict__


def test_prepacked_decoding_equals_generate(trained, packed_calls):
    """The trained tiny model (drafts really accepted), packed; every mode decodes what ``transformers``
    ``generate`` writes on the weights as stored, cached and uncached."""
    packed_before = bool(packed_layers(trained.model))  # SDLM.load's default on this CPU
    trained.prepack()
    try:
        for seed, length in [(1, 5), (2, 11)]:
            prompt = random_prompt(seed, length)
            with packing_off():
                want = hf_greedy(trained, prompt, 24)
            for mode, D, cache in [("ar", 4, True), ("speculative", 2, True), ("speculative", 4, True),
                                   ("speculative", 8, True), ("speculative", 4, False)]:
                g = Decoder(trained, GenerationConfig(mode=mode, block_size=D, max_new_tokens=24,
                                                      use_cache=cache)).generate(prompt)
                assert g.tokens == want, (mode, D, cache)
    finally:
        if not packed_before:  # the shared fixture as the other tests get it
            trained.unpack()
    assert packed_calls  # the decoders ran packed


@pytest.mark.parametrize("vendor, mkl, packs32", [("AuthenticAMD", True, True), ("GenuineIntel", True, False),
                                                   ("GenuineIntel", False, True), (None, True, True)])
def test_load_packs_where_it_pays_and_as_told(tmp_path, monkeypatch, vendor, mkl, packs32):
    """By default float32 is packed except on an Intel CPU with MKL (whose own float32 products were the faster
    there); bf16 is packed wherever the build can; True and False force it either way."""
    import sdlm.cpu as cpu
    from conftest import make_sdlm
    from sdlm.model import SDLM

    info = {"flags": "avx2 avx512f avx512_bf16"} | ({"vendor_id": vendor} if vendor else {})
    monkeypatch.setattr(cpu, "_cpuinfo", lambda: info)
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: mkl)
    assert cpu.intel_mkl() is (vendor == "GenuineIntel" and mkl)
    assert cpu.packing_pays(torch.float32) is packs32 and cpu.packing_pays(torch.bfloat16)
    path = make_sdlm("llama").save(tmp_path / "m")
    assert bool(packed_layers(SDLM.load(str(path)).model)) is packs32
    assert packed_layers(SDLM.load(str(path), prepack=True).model)
    assert not packed_layers(SDLM.load(str(path), prepack=False).model)
    if can_prepack(torch.bfloat16):
        assert packed_layers(SDLM.load(str(path), dtype=torch.bfloat16).model)


def test_weights_made_under_inference_mode_are_left_unpacked(caplog):
    """A model built under ``torch.inference_mode`` has inference tensors for weights, with no version count,
    so a packed copy could not notice a change: such layers run unpacked (loading used to fail there), the
    load says so, and decoding writes the same tokens as a model built outside."""
    from sdlm.model import SDLM

    prompt = [5, 17, 99, 3]
    config = GenerationConfig(mode="speculative", max_new_tokens=12)
    outside = SDLM.load("random:llama", quiet=True, prepack=True)
    assert packed_layers(outside.model)
    want = Decoder(outside, config).generate(prompt).tokens
    with torch.inference_mode():
        inside = SDLM.load("random:llama", quiet=True, prepack=True)
        got = Decoder(inside, config).generate(prompt).tokens
    assert not packed_layers(inside.model) and "under torch.inference_mode" in caplog.text
    assert got == want
    lin = _layer(torch.float32)  # routed, then given an inference tensor: its own forward, not a stale copy
    prepack_linears(lin)
    x = torch.randn(3, 96)
    with torch.inference_mode():
        lin.weight = torch.nn.Parameter(torch.randn(160, 96), requires_grad=False)
        with plain_inference():
            assert packed_call(lin, x) is None
        assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))


def test_the_trainer_does_not_pack(tmp_path):
    from conftest import TINY_RECIPE
    from sdlm.train.trainer import TrainConfig, Trainer

    tr = Trainer(TrainConfig.from_yaml(TINY_RECIPE, {"out_dir": str(tmp_path / "run"), "steps": 1}))
    assert not packed_layers(tr.sdlm.model)


def test_load_keeps_the_stored_weights_when_memory_is_short(tmp_path, monkeypatch, caplog):
    import sdlm.cpu as cpu
    from conftest import make_sdlm
    from sdlm.model import SDLM

    monkeypatch.setattr(cpu, "packing_pays", lambda dtype: True)  # as on a CPU where packing is the default
    path = make_sdlm("llama").save(tmp_path / "m")
    need = cpu.packed_bytes(SDLM.load(str(path), prepack=False).model)
    assert need > 0
    monkeypatch.setattr(cpu, "available_memory", lambda: 2 * need - 1)  # the copies would take over half
    with caplog.at_level("WARNING", logger="sdlm.cpu"):
        assert not packed_layers(SDLM.load(str(path)).model)
    assert "not prepacking" in caplog.text
    assert packed_layers(SDLM.load(str(path), prepack=True).model)  # asked for: packed anyway
    monkeypatch.setattr(cpu, "available_memory", lambda: 2 * need)
    assert packed_layers(SDLM.load(str(path)).model)


@pytest.mark.parametrize("flags, bf16", [("fpu sse avx2 fma", False), ("avx2 avx512f avx512_bf16", True),
                                         ("avx2 amx_bf16 amx_tile", True), ("", False)])
def test_cpu_description_names_the_cpu_and_its_bf16(monkeypatch, flags, bf16):
    import sdlm.cpu as cpu
    import sdlm.train.trainer as trainer_mod

    info = {"model name": "Some CPU 9000", "flags": flags} if flags else {}
    monkeypatch.setattr(cpu, "_cpuinfo", lambda: info)
    assert cpu.native_bf16() is bf16 and trainer_mod._bf16_supported("cpu") is bf16
    assert cpu.native(torch.bfloat16) is bf16 and cpu.native(torch.float32) and not cpu.native(torch.float16)
    text = cpu.describe()
    amx = "amx_bf16" in flags
    assert cpu.has_amx() is amx
    assert text.endswith(f"{'native bf16' if bf16 else 'no native bf16'}{', AMX' if amx else ''})")
    assert text.startswith("Some CPU 9000 (" if flags else "") and torch.backends.cpu.get_cpu_capability() in text


def test_cpuinfo_reads_this_machine():
    import sdlm.cpu as cpu

    info = cpu._cpuinfo()
    if info:  # Linux: the first processor's fields
        assert "flags" in info and cpu.native_bf16() is bool({"avx512_bf16", "amx_bf16"} & set(info["flags"].split()))


@pytest.mark.parametrize("flags", ["avx2 fma", "avx2 avx512_bf16 avx512_fp16"])
def test_loading_in_bf16_on_a_cpu_without_it_warns(monkeypatch, caplog, flags):
    import sdlm.cpu as cpu
    from sdlm.model import SDLM

    monkeypatch.setattr(cpu, "_cpuinfo", lambda: {"flags": flags})
    with caplog.at_level("WARNING", logger="sdlm.model"):
        SDLM.load("random:llama", dtype=torch.bfloat16, quiet=True, prepack=False)
        SDLM.load("random:llama", dtype=torch.float16, quiet=True, prepack=False)
        SDLM.load("random:llama", quiet=True, prepack=False)  # float32: nothing to say
    said = [r.getMessage() for r in caplog.records if "emulated" in r.getMessage()]
    assert len(said) == (0 if "bf16" in flags else 2)
