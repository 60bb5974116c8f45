"""Block attention (sdlm.attention): the same attention as sdpa with the dense block-rule mask."""

import functools

import pytest
import torch
import torch.nn.functional as F

import sdlm.attention as attention_mod

from sdlm.attention import (BLOCK_ATTENTION, CausalSegments, _chunks, block_attention, block_layout, causal_segments,
                            causal_segments_attention, causal_segments_sdpa, clean_pass_kernel,
                            use_block_attention)
from sdlm.decode import Decoder, GenerationConfig
from sdlm.layout import sample_block_starts, training_layout
from sdlm.masks import TokenInfo, additive, allowed
from sdlm.train.loss import dense_loss, pack, two_pass_loss

from test_train import adapted, loss_and_grads


def _rows(D, specs, seed=0):
    """A batch of one-sample rows, each ``(clean length, block starts)``, padded: the clean parts to the
    longest, the block parts to the most blocks (pad block ids negative, pad seq -1)."""
    L = max(n for n, _ in specs)
    K = max(len(st) for _, st in specs)
    B = len(specs)
    clean = TokenInfo(torch.zeros(B, L, dtype=torch.long), torch.full((B, L), -1), torch.full((B, L), -1),
                      torch.full((B, L), -1))
    q = TokenInfo(torch.zeros(B, K * D, dtype=torch.long), -2 - torch.arange(K * D).repeat(B, 1),
                  torch.full((B, K * D), -1), torch.full((B, K * D), -1))
    for b, (n, starts) in enumerate(specs):
        clean.pos[b, :n], clean.seq[b, :n] = torch.arange(n), 0
        for i, p in enumerate(starts):
            cols = slice(i * D, (i + 1) * D)
            q.pos[b, cols], q.block[b, cols], q.start[b, cols], q.seq[b, cols] = torch.arange(p, p + D), i, p, 0
    return q, clean


def _dense_and_blocks(q0, k0, v0, dense, layout, scale, w):
    """Output and q, k, v gradients (of the loss ``(o * w).sum()``) of sdpa with the dense mask ``dense``,
    then of block attention under ``layout``."""
    outs = []
    for fn in (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense, scale=scale, enable_gqa=True),
               lambda q, k, v: block_attention(q, k, v, layout, scale)):
        q, k, v = (t.clone().requires_grad_(True) for t in (q0, k0, v0))
        o = fn(q, k, v)
        (o * w).sum().backward()
        outs.append((o, q.grad, k.grad, v.grad))
    return outs


@pytest.mark.parametrize("causal,chunk", [(False, 32), (True, 32), (False, 1), (True, 3)])
def test_block_attention_equals_dense_sdpa(causal, chunk):
    """Outputs and gradients of the real queries equal sdpa's under the dense mask of the block rule, with
    grouped-query heads, ragged rows (padding in the clean and block parts) and blocks starting at 0; with
    all blocks in one score product and ``chunk`` blocks per product, each over the clean keys its blocks
    see (fewer for the early chunks)."""
    D, H, Hkv, d = 4, 4, 2, 8
    q_info, clean = _rows(D, [(11, [0, 3, 7, 10]), (7, [2, 5])])
    B, T, L = q_info.pos.shape[0], q_info.pos.shape[1], clean.pos.shape[1]
    layout = block_layout(q_info, clean, D, causal, torch.float32)
    assert layout is not None and len(layout.parts) == 1 and layout.parts[0].clean_bias.shape == (B, 1, T, L)
    layout.chunk = chunk
    # row 0's blocks see 0, 3, 7, 10 clean keys, row 1's 2 and 5, and row 1's padding queries its padding keys
    want = {32: [(0, 4, 11)], 1: [(0, 1, 2), (1, 2, 5), (2, 3, 11), (3, 4, 11)], 3: [(0, 2, 5), (2, 4, 11)]}[chunk]
    assert _chunks(layout.parts[0], D, chunk) == want
    dense = additive(allowed(q_info, TokenInfo.cat([clean, q_info]), causal), torch.float32)
    g = torch.Generator().manual_seed(0)
    q0, k0, v0 = (torch.randn(B, h, n, d, generator=g) for h, n in ((H, T), (Hkv, L + T), (Hkv, L + T)))
    real = (q_info.seq >= 0)[:, None, :, None].float()
    w = torch.randn(B, H, T, d, generator=g) * real  # a loss that reads the real queries only
    outs = [(o * real, *grads) for o, *grads in _dense_and_blocks(q0, k0, v0, dense, layout, 0.3, w)]
    for a, b in zip(*outs):
        assert torch.allclose(a, b, atol=1e-5)


def test_block_attention_under_bf16_autocast_and_without_clean_gradients():
    """Under bf16 autocast, with float32 queries and keys (rotary embeddings make them so) and bf16 values,
    block attention computes in bf16 like sdpa does there: outputs and gradients within bf16 rounding of
    sdpa's, in the inputs' dtypes. With ``clean_needs_grad`` off, the clean keys and values get zero
    gradients and the block part's are unchanged."""
    D, H, Hkv, d = 4, 6, 2, 16
    q_info, clean = _rows(D, [(23, [0, 5, 9, 14, 20]), (17, [3, 8, 12])])
    B, T, L = q_info.pos.shape[0], q_info.pos.shape[1], clean.pos.shape[1]
    layout = block_layout(q_info, clean, D, False, torch.float32)
    dense = additive(allowed(q_info, TokenInfo.cat([clean, q_info])), torch.float32)
    g = torch.Generator().manual_seed(2)
    q0, k0 = torch.randn(B, H, T, d, generator=g), torch.randn(B, Hkv, L + T, d, generator=g)
    v0 = torch.randn(B, Hkv, L + T, d, generator=g).bfloat16()
    real = (q_info.seq >= 0)[:, None, :, None].float()
    w = torch.randn(B, H, T, d, generator=g) * real
    outs = []
    for fn in (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense, scale=0.25, enable_gqa=True),
               lambda q, k, v: block_attention(q, k, v, layout, 0.25)):
        q, k, v = (t.clone().requires_grad_(True) for t in (q0, k0, v0))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            o = fn(q, k, v)
        (o.float() * w).sum().backward()
        assert o.dtype == torch.bfloat16 and q.grad.dtype == k.grad.dtype == torch.float32 and v.grad.dtype == torch.bfloat16
        outs.append((o.float() * real, q.grad, k.grad, v.grad.float()))
    for a, b in zip(*outs):
        assert (a - b).norm() <= 2e-2 * b.norm()
    layout.clean_needs_grad = False
    q, k, v = (t.clone().float().requires_grad_(True) for t in (q0, k0, v0))
    (block_attention(q, k, v, layout, 0.25) * w).sum().backward()
    full = [t.clone().float().requires_grad_(True) for t in (q0, k0, v0)]
    layout.clean_needs_grad = True
    (block_attention(*full, layout, 0.25) * w).sum().backward()
    assert k.grad[:, :, :L].abs().max() == 0 and v.grad[:, :, :L].abs().max() == 0
    assert full[1].grad[:, :, :L].abs().max() > 0
    assert torch.allclose(q.grad, full[0].grad) and torch.allclose(k.grad[:, :, L:], full[1].grad[:, :, L:])
    assert torch.allclose(v.grad[:, :, L:], full[2].grad[:, :, L:])


CLEAN_KERNELS = {"chunks": functools.partial(causal_segments_attention, chunk=32), "sdpa": causal_segments_sdpa}


@pytest.mark.parametrize("kernel", CLEAN_KERNELS)
def test_causal_segments_attention_equals_sdpa_per_segment(kernel):
    """The clean pass's attention (no gradients), both ways: causal within each segment, nothing across them,
    equal to sdpa's causal attention run segment by segment, with segments longer and shorter than a chunk
    (one of a single token), grouped-query heads, in float32 and, within bf16 rounding, in bfloat16."""
    causal_segments_attention = CLEAN_KERNELS[kernel]
    g = torch.Generator().manual_seed(4)
    H, Hkv, d = 6, 2, 16
    bounds = [(0, 7), (7, 150), (150, 151), (151, 300)]
    T = bounds[-1][1]
    q0 = torch.randn(1, T, H, d, generator=g).transpose(1, 2)  # the model's query layout
    k0, v0 = torch.randn(1, Hkv, T, d, generator=g), torch.randn(1, Hkv, T, d, generator=g)
    ref = torch.cat([F.scaled_dot_product_attention(q0[:, :, a:b], k0[:, :, a:b], v0[:, :, a:b], is_causal=True,
                                                    scale=0.3, enable_gqa=True).transpose(1, 2) for a, b in bounds], 1)
    got = causal_segments_attention(q0, k0, v0, CausalSegments(bounds), 0.3)
    assert got.shape == (1, T, H, d) and torch.allclose(got, ref, atol=1e-5)
    one = causal_segments_attention(q0, k0, v0, CausalSegments([(0, T)]), 0.3)
    assert not torch.allclose(one[0, 7:150], ref[0, 7:150], atol=1e-3)  # across segments it is another attention
    q, k, v = (t.bfloat16() for t in (q0, k0, v0))
    sdpa_bf16 = torch.cat([F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True,
                                                          scale=0.3, enable_gqa=True).transpose(1, 2)
                           for a, b in bounds], 1)
    got = causal_segments_attention(q, k, v, CausalSegments(bounds), 0.3)
    assert got.dtype == torch.bfloat16
    assert (got.float() - ref).norm() <= 2 * (sdpa_bf16.float() - ref).norm() + 1e-3 * ref.norm()


def test_block_layout_refuses_other_shapes():
    """Blocks out of order, a partial block, a block among the clean keys, a sample spread over two runs
    of a row, or padded rows of several samples get no layout (the caller then builds the dense mask);
    one row of whole samples without padding gets a part per sample."""
    D = 4
    q, clean = _rows(D, [(9, [1, 4, 6])])
    assert block_layout(q, clean, D, False, torch.float32) is not None
    swapped = TokenInfo(q.pos, q.block.flip(-1), q.start, q.seq)
    assert block_layout(swapped, clean, D, False, torch.float32) is None
    cut = TokenInfo(q.pos[:, :-1], q.block[:, :-1], q.start[:, :-1], q.seq[:, :-1])
    assert block_layout(cut, clean, D, False, torch.float32) is None
    half = TokenInfo(q.pos, q.block.clone(), q.start, q.seq)
    half.block[0, -2:] = -5  # half of the last block is padding
    assert block_layout(half, clean, D, False, torch.float32) is None
    with_block = TokenInfo(clean.pos, clean.block.clone(), clean.start, clean.seq)
    with_block.block[0, 3] = 0
    assert block_layout(q, with_block, D, False, torch.float32) is None
    g = torch.Generator().manual_seed(1)
    lays = []
    for n in (12, 10):
        lm = torch.zeros(n, dtype=torch.bool)
        lm[3:] = True
        lays.append(training_layout(torch.randint(0, 50, (n,), generator=g), lm, sample_block_starts(lm, 2, g), D, 99))
    lays.append(lays[0])
    packed = pack(lays, row_tokens=1024)  # three samples in one row, no padding: a part each
    L = packed.n_clean
    blocks, clean = packed.columns(torch.arange(L, packed.input_ids.shape[1])), packed.columns(torch.arange(L))
    layout = block_layout(blocks.info, clean.info, D, False, torch.float32)
    assert [(p.c0, p.c1, p.b0, p.b1) for p in layout.parts] == [(0, 12, 0, 8), (12, 22, 8, 16), (22, 34, 16, 24)]
    assert causal_segments(clean.info).bounds == [(0, 12), (12, 22), (22, 34)]
    assert causal_segments(TokenInfo(clean.info.pos, clean.info.block, clean.info.start)) is None  # no seq
    # a sample whose blocks are split across two runs of the row, or a padded row of two samples: no layout
    split = TokenInfo(blocks.info.pos, blocks.info.block, blocks.info.start, blocks.info.seq.clone())
    split.seq[0, :4] = 2
    assert block_layout(split, clean.info, D, False, torch.float32) is None
    two_rows = pack(lays + lays[:1], row_tokens=40)
    L2 = two_rows.n_clean
    assert two_rows.input_ids.shape[0] == 2
    assert block_layout(two_rows.columns(torch.arange(L2, two_rows.input_ids.shape[1])).info,
                        two_rows.columns(torch.arange(L2)).info, D, False, torch.float32) is None
    assert causal_segments(two_rows.columns(torch.arange(L2)).info) is None


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_two_pass_with_block_attention_equals_dense(arch):
    """A model set up with block attention: the two-pass loss of one sample, of one-sample rows with
    padding, and of one row holding all samples (the trainer's CPU layout: a part per sample, the
    clean pass causal within each) equals the dense reference (loss, metrics, gradients); decoding on
    it is unchanged."""
    s, ad = adapted(arch)
    g = torch.Generator().manual_seed(3)
    lays = []
    for n, k in ((21, 5), (14, 2), (30, 7)):
        lm = torch.zeros(n, dtype=torch.bool)
        lm[4:] = True
        lays.append(training_layout(torch.randint(0, 250, (n,), generator=g), lm, sample_block_starts(lm, k, g), 4,
                                    s.config.mask_token_id))
    dec = Decoder(s, GenerationConfig(mode="speculative", max_new_tokens=12, block_size=4))
    with torch.no_grad():
        out_ref = dec.generate([5, 17, 33, 8]).tokens

    run = functools.partial(loss_and_grads, s, ad)

    batches = [pack([lays[0]]), pack(lays, row_tokens=None), pack(lays, row_tokens=10_000)]
    assert batches[2].input_ids.shape[0] == 1
    refs = [run(dense_loss, b) for b in batches]
    use_block_attention(s.model)
    assert s.model.config._attn_implementation == BLOCK_ATTENTION
    for b, (r, gr) in zip(batches, refs):
        o, go = run(two_pass_loss, b)
        assert torch.allclose(r.loss, o.loss, atol=1e-5)
        assert torch.equal(r.slot_correct, o.slot_correct) and torch.equal(r.slot_count, o.slot_count)
        for x, y in zip(gr, go):  # float32 rounding: the dense reference's own error against float64 reaches
            assert (x - y).abs().max() <= 1e-4 * x.abs().max()  # 2e-5 of the largest gradient here
    with torch.no_grad():
        assert dec.generate([5, 17, 33, 8]).tokens == out_ref


def test_clean_pass_stops_after_the_last_layers_keys_and_values(monkeypatch):
    """With hard labels the clean pass of the one-row step is run for its KV cache only: it stops once the
    last layer's keys and values are cached, so that layer's MLP runs in the block pass alone (every
    other layer's in both passes), and the loss is that of the whole clean pass."""
    import sdlm.train.loss as loss_mod
    from sdlm.train.trainer import decoder_layers

    s, ad = adapted("llama")
    g = torch.Generator().manual_seed(5)
    lays = []
    for n, k in ((19, 4), (26, 6)):
        lm = torch.zeros(n, dtype=torch.bool)
        lm[5:] = True
        lays.append(training_layout(torch.randint(0, 250, (n,), generator=g), lm, sample_block_starts(lm, k, g), 4,
                                    s.config.mask_token_id))
    batch = pack(lays, row_tokens=10_000)
    use_block_attention(s.model)
    layers = decoder_layers(s.model)
    calls = [0] * len(layers)
    for i, layer in enumerate(layers):
        layer.mlp.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
    stopped = two_pass_loss(s, batch, 4)
    assert calls == [2] * (len(layers) - 1) + [1]
    calls[:] = [0] * len(layers)
    whole = loss_mod.fill_cache
    monkeypatch.setattr(loss_mod, "fill_cache", lambda run, layout, last: whole(run, layout, None))
    full = two_pass_loss(s, batch, 4)  # the same step with the whole clean pass run
    assert calls == [2] * len(layers)
    assert torch.equal(stopped.loss, full.loss)
    assert torch.equal(stopped.slot_correct, full.slot_correct)


@pytest.mark.parametrize("kernel", CLEAN_KERNELS)
def test_causal_segments_attention_with_a_shared_prefix_equals_the_dense_rule(kernel):
    """A row whose samples share a prefix held once (seq SHARED), both ways: the prefix is causal within
    itself and every segment sees all of it, then itself causally; the same as sdpa under the dense rule
    of sdlm.masks, and as each sample run whole with its own copy of the prefix. A prefix with no
    segment after it is attended too."""
    from sdlm.masks import SHARED

    causal_segments_attention = CLEAN_KERNELS[kernel]

    g = torch.Generator().manual_seed(6)
    H, Hkv, d, P = 6, 2, 16, 9
    own = [40, 1, 150]
    seq = torch.cat([torch.full((P,), SHARED)] + [torch.full((n,), i) for i, n in enumerate(own)])
    pos = torch.cat([torch.arange(P)] + [torch.arange(P, P + n) for n in own])
    info = TokenInfo(pos[None], torch.full_like(pos, -1)[None], torch.full_like(pos, -1)[None], seq[None])
    layout = causal_segments(info)
    assert layout.prefix == P and layout.bounds == [(9, 49), (49, 50), (50, 200)]
    T = pos.numel()
    q0 = torch.randn(1, T, H, d, generator=g).transpose(1, 2)
    k0, v0 = torch.randn(1, Hkv, T, d, generator=g), torch.randn(1, Hkv, T, d, generator=g)
    dense = additive(allowed(info, info), torch.float32)
    ref = F.scaled_dot_product_attention(q0, k0, v0, attn_mask=dense, scale=0.3, enable_gqa=True).transpose(1, 2)
    got = causal_segments_attention(q0, k0, v0, layout, 0.3)
    assert torch.allclose(got, ref, atol=1e-5)
    alone = causal_segments_attention(q0[:, :, :P], k0[:, :, :P], v0[:, :, :P], CausalSegments([], P), 0.3)
    assert torch.allclose(alone, ref[:, :P], atol=1e-5)
    for a, b in layout.bounds:  # each sample whole, with its own copy of the prefix
        cols = torch.cat([torch.arange(P), torch.arange(a, b)])
        whole = F.scaled_dot_product_attention(q0[:, :, cols], k0[:, :, cols], v0[:, :, cols], is_causal=True,
                                               scale=0.3, enable_gqa=True).transpose(1, 2)
        assert torch.allclose(got[:, a:b], whole[:, P:], atol=1e-5)
    assert torch.allclose(got[:, :P], whole[:, :P], atol=1e-5)


def test_clean_pass_kernel_by_device_and_dtype(monkeypatch):
    """``clean_attention: auto`` takes the chunked products only for bf16 on a CPU without AMX (where they
    were measured faster) and sdpa for float32, on CPUs with AMX and on other devices."""
    import sdlm.cpu as cpu

    cpu_dev, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(cpu, "_cpuinfo", lambda: {"flags": "avx512f avx512_bf16"})
    assert not cpu.has_amx()
    assert clean_pass_kernel(cpu_dev, torch.bfloat16) == "chunks"
    assert clean_pass_kernel(cpu_dev, torch.float32) == "sdpa" and clean_pass_kernel(cuda, torch.bfloat16) == "sdpa"
    monkeypatch.setattr(cpu, "_cpuinfo", lambda: {"flags": "avx512f avx512_bf16 amx_bf16 amx_tile"})
    assert cpu.has_amx() and "AMX" in cpu.describe()
    assert clean_pass_kernel(cpu_dev, torch.bfloat16) == "sdpa"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_two_pass_with_a_shared_prefix_equals_unshared(arch):
    """Samples that begin with the same tokens (a chat template's system prompt) packed in one row with
    that prefix held once: the dense reference, the two-pass step with block attention, and the soft-target
    step give the losses, metrics and gradients of the same samples packed without sharing."""
    s, ad = adapted(arch)
    g = torch.Generator().manual_seed(7)
    head = torch.randint(0, 250, (11,), generator=g)
    lays = []
    for n, k, prompt in ((30, 6, 14), (24, 4, 13), (37, 8, 16)):
        ids = torch.cat([head, torch.randint(0, 250, (n - 11,), generator=g)])
        lm = torch.zeros(n, dtype=torch.bool)
        lm[prompt:] = True
        lays.append(training_layout(ids, lm, sample_block_starts(lm, k, g), 4, s.config.mask_token_id))

    run = functools.partial(loss_and_grads, s, ad)

    plain, shared = pack(lays, row_tokens=10_000), pack(lays, row_tokens=10_000, share_prefix=True)
    assert shared.n_clean == plain.n_clean - 2 * 11  # the prefix once instead of three times
    ref = run(dense_loss, plain)
    checks = [(run(dense_loss, shared), ref)]
    soft_ref = run(two_pass_loss, plain, distill=0.5)
    use_block_attention(s.model)
    checks += [(run(two_pass_loss, shared), ref), (run(two_pass_loss, shared, distill=0.5), soft_ref)]
    ran = []
    for kernel in ("chunks", "sdpa"):  # the clean pass's attention either way (counted: it is the one asked)
        name = {"chunks": "causal_segments_attention", "sdpa": "causal_segments_sdpa"}[kernel]
        real = getattr(attention_mod, name)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(attention_mod, name, lambda *a, real=real, **k: ran.append(kernel) or real(*a, **k))
            checks += [(run(two_pass_loss, shared, clean_attention=kernel), ref),
                       (run(two_pass_loss, shared, distill=0.5, clean_attention=kernel), soft_ref)]
    n = s.model.config.num_hidden_layers  # every layer with soft targets, all but the last (KV only) without
    assert ran == ["chunks"] * (2 * n - 1) + ["sdpa"] * (2 * n - 1)
    for (o, go), (r, gr) in checks:
        assert torch.allclose(r.loss, o.loss, atol=1e-5)
        assert torch.equal(r.slot_correct, o.slot_correct) and torch.equal(r.slot_count, o.slot_count)
        for x, y in zip(gr, go):
            assert (x - y).abs().max() <= 1e-4 * x.abs().max()


def test_shared_prefix_stops_before_labels_and_own_tokens():
    """The shared prefix is the clean tokens every sample begins with, stopping before the first token
    that carries an AR label (its label is the sample's own next token) and leaving each sample a clean
    token of its own; one sample shares nothing."""
    from sdlm.train.loss import shared_prefix

    def lay(ids, first_target):
        lm = torch.zeros(len(ids), dtype=torch.bool)
        lm[first_target:] = True
        return training_layout(torch.tensor(ids), lm, [first_target - 1], 2, 999)

    a, b = lay([1, 2, 3, 4, 5, 6, 7, 8], 6), lay([1, 2, 3, 4, 9, 9, 9, 9], 6)
    assert shared_prefix([a, b]) == 4 and shared_prefix([a]) == 0
    assert shared_prefix([a, lay([1, 2, 3, 4, 5, 6, 7, 9], 3)]) == 2  # x_2 carries the label x_3
    assert shared_prefix([a, lay([1, 2, 3, 4, 5, 6, 7, 8], 6)]) == 5  # identical: up to the first label
    assert shared_prefix([lay([1, 2, 3], 2), lay([1, 2, 3, 4], 3)]) == 1
    assert shared_prefix([a, lay([7, 2, 3, 4, 5, 6, 7, 8], 6)]) == 0


@pytest.mark.parametrize("chunk", [32, 2])
def test_block_attention_over_a_shared_prefix_equals_dense_sdpa(chunk):
    """One row of samples with a shared prefix: each sample's blocks see the prefix and their own clean
    keys; outputs and all gradients, the shared prefix's keys and values included (summed over the
    samples), equal sdpa with the dense rule's mask, with all of a sample's blocks in one score product and
    2 per product."""
    g = torch.Generator().manual_seed(8)
    head = torch.randint(0, 250, (7,), generator=g)
    lays = []
    for n, k, prompt in ((26, 5, 10), (19, 3, 9)):
        lm = torch.zeros(n, dtype=torch.bool)
        lm[prompt:] = True
        ids = torch.cat([head, torch.randint(0, 250, (n - 7,), generator=g)])
        lays.append(training_layout(ids, lm, sample_block_starts(lm, k, g), 4, 999))
    b = pack(lays, row_tokens=10_000, share_prefix=True)
    L, T = b.n_clean, b.input_ids.shape[1]
    clean, q_info = b.columns(torch.arange(L)).info, b.columns(torch.arange(L, T)).info
    layout = block_layout(q_info, clean, 4, False, torch.float32)
    assert [p.prefix for p in layout.parts] == [7, 7]
    layout.chunk = chunk
    spans = [cv for p in layout.parts for _, _, cv in _chunks(p, 4, chunk)]
    assert len(spans) == (2 if chunk == 32 else 5)  # 5 and 3 blocks
    assert min(spans) < min(p.n_clean for p in layout.parts)  # a product leaves out keys its blocks never see
    dense = additive(allowed(q_info, TokenInfo.cat([clean, q_info])), torch.float32)
    H, Hkv, d = 6, 2, 16
    q0, k0, v0 = (torch.randn(1, h, n, d, generator=g) for h, n in ((H, T - L), (Hkv, T), (Hkv, T)))
    w = torch.randn(1, H, T - L, d, generator=g)
    outs = _dense_and_blocks(q0, k0, v0, dense, layout, 0.25, w)
    assert outs[0][2][:, :, :7].abs().max() > 0  # the prefix's keys get gradients from both samples
    for a, c in zip(*outs):
        assert torch.allclose(a, c, atol=1e-5)


def test_row_split_plans_each_causal_row_over_the_keys_an_ar_step_holds():
    """A chain step (a token, 2 drafts, 2 candidate blocks of 3): each causal row alone over the cache and the
    step's rows up to itself, the blocks together over every key; a draft tree's node over the cache and its
    ancestors; a step that fills an empty cache: its leading causal rows together, as a prefill."""
    from sdlm.attention import RowSplit

    chain = RowSplit([False, False, False, True, True, True, True, True, True])
    calls, in_order = chain.plan(12 + 9, "cpu")
    assert in_order
    assert calls[:3] == [(slice(0, 1), slice(0, 13)), (slice(1, 2), slice(0, 14)), (slice(2, 3), slice(0, 15))]
    assert calls[3] == (slice(3, 9), slice(None))
    vis = torch.ones(4, 4, dtype=torch.bool).tril()
    vis[2, 1] = False  # node 2 is a sibling of node 1: both children of the root
    tree = RowSplit([False, False, False, True], vis)
    rows, cols = tree.plan(5 + 4, "cpu")[0][2]
    assert rows == slice(2, 3) and cols.tolist() == [0, 1, 2, 3, 4, 5, 7]
    first = RowSplit([False] * 6 + [True] * 4, first=True)
    assert first.plan(10, "cpu") == ([(slice(0, 6), slice(0, 6)), (slice(6, 10), slice(None))], True)
    assert first.leading_causal() == 6 and first.part(6, 10).is_block == [True] * 4 and not first.part(6, 10).first


def _rows_exact_in_bf16(model) -> bool:
    """Whether this CPU's bf16 products give every row of ``model``'s linear layers the same numbers at 1 to
    16 rows (oneDNN's do on the CPUs measured; a CPU whose kernels change with the row count cannot be exact)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear):
                x = torch.randn(16, mod.in_features, generator=g).to(mod.weight.dtype)
                full = mod(x)
                if any(not torch.equal(mod(x[:m]), full[:m]) for m in (1, 2, 5, 8)):
                    return False
    return True


def test_bf16_speculative_decoding_writes_ar_tokens_on_a_cpu(trained):
    """In bfloat16 on a CPU, a speculative step runs its causal rows' attention as one-token steps would
    (sdlm.attention.RowSplit), so that the lossless modes write exactly bf16 ``ar``'s tokens, chain and tree,
    with drafts really accepted; a prompt and its first block run as a prefill, then the block."""
    from sdlm.model import SDLM

    s = SDLM.load(trained.name, dtype=torch.bfloat16)
    assert s.dtype == torch.bfloat16 and s.row_exact
    if not _rows_exact_in_bf16(s.model):
        pytest.skip("this CPU's bf16 products give a row different numbers by the rows beside it")
    prompts = [list(b"abcabcabcab"), list(b"xyzxyzxy"), list(b"hello hello hel")]
    for prompt in prompts:
        ar = Decoder(s, GenerationConfig(mode="ar", max_new_tokens=40)).generate(prompt).tokens
        for kw in ({}, {"draft_threshold": 0, "block_threshold": 0}, {"tree": "2,1"},
                   {"block_size": 8, "draft_threshold": 0, "block_threshold": 0}):  # 72-row steps (exact_rows)
            kw = {"block_size": 4, **kw}
            got = Decoder(s, GenerationConfig(mode="speculative", max_new_tokens=40, **kw)).generate(prompt)
            assert got.tokens == ar, (prompt, kw)
            assert got.tokens_per_forward > 1.3


def test_bf16_steps_give_causal_rows_the_numbers_of_one_token_steps(trained, monkeypatch):
    """Bitwise, in bfloat16 on a CPU: the causal rows of a speculative step (drafts, one or every candidate
    block) get the final hidden states that one-token ``ar`` steps give them, and a first step (a prompt and
    its block) gives the prompt's rows those of an ``ar`` prefill. The step runs one attention call per
    causal row and one for its blocks in each layer; with ``row_exact`` off, one call (whether that changes
    the numbers depends on the kernel's sizes: at SmolLM2's it does, at this tiny model's it may not)."""
    from sdlm.kvcache import new_cache
    from sdlm.layout import ar_step, speculative_step
    from sdlm.model import SDLM

    torch.set_num_threads(2)  # as decoding runs (the autouse fixture restores one thread)
    s = SDLM.load(trained.name, dtype=torch.bfloat16)
    if not _rows_exact_in_bf16(s.model):
        pytest.skip("this CPU's bf16 products give a row different numbers by the rows beside it")
    seq, n, mask = list(b"the cat sat on the mat and the dog sat on the log; " * 4), 150, s.config.mask_token_id
    cache = new_cache(s.device)
    pre = s.step_hidden(ar_step(seq[:n], 0), cache, 0)
    ar = [s.step_hidden(ar_step([seq[n + i]], n + i), cache, n + i)[0] for i in range(4)]
    s.crop(cache, 4)
    for blocks in (range(1), None):
        st = speculative_step([seq[n]], n, seq[n + 1:n + 4], 4, mask, None, blocks=blocks)
        h = s.step_hidden(st, cache, n)
        assert all(torch.equal(h[i], ar[i]) for i in range(4)), blocks
        s.crop(cache, len(st.input_ids))
    first = speculative_step(seq[:n], 0, [], 4, mask, None)
    h = s.step_hidden(first.__class__(first.input_ids, first.info, n + 4), new_cache(s.device), 0)  # every row
    assert torch.equal(h[n - 1], pre[-1])
    # the same through step_logits (the path of models whose head is not plain): the prompt's last row is the
    # prefill's, from a call of its own
    forwards = []
    real_forward = s.forward
    monkeypatch.setattr(s, "forward", lambda *a, **k: forwards.append(a[0].shape[1]) or real_forward(*a, **k))
    prefill = s.step_logits(ar_step(seq[:n], 0), new_cache(s.device), 0)
    logits = s.step_logits(first, new_cache(s.device), 0)
    assert logits.shape[0] == first.n_logits == 5 and torch.equal(logits[0], prefill[0])
    assert forwards == [n, n, 4]
    monkeypatch.setattr(s, "forward", real_forward)

    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, *a, **k: calls.append(q.shape[2]) or real(q, *a, **k))
    layers = s.model.config.num_hidden_layers
    st = speculative_step([seq[n]], n, seq[n + 1:n + 3], 4, mask, None)  # 3 causal rows, 3 blocks of 4
    s.step_hidden(st, cache, n)
    s.crop(cache, len(st.input_ids))
    assert calls == [1, 1, 1, 12] * layers
    calls.clear()
    s.row_exact = False
    s.step_hidden(st, cache, n)
    assert calls == [15] * layers
