"""Gathered attention (sdlm.gathered): the same attention as sdpa with the dense block-rule mask, over
only the keys each chunk of queries sees."""

import functools

import pytest
import torch
import torch.nn.functional as F

from sdlm.attention import GATHER_ATTENTION, use_gathered_attention
from sdlm.decode import Decoder, GenerationConfig
from sdlm.gathered import _bucket_widths, gathered, gathered_attention
from sdlm.layout import sample_block_starts, training_layout
from sdlm.masks import TokenInfo, additive, allowed
from sdlm.train.loss import dense_loss, pack, two_pass_loss

from test_train import adapted, loss_and_grads


def _packed(D=4, seed=0, n_samples=5, row_tokens=60, share_prefix=True, mask_id=300):
    """A packed batch of random samples that begin with the same 6 tokens: several rows, several samples per
    row, a shared prefix, padding in both parts. Returns the batch and its clean and block columns."""
    g = torch.Generator().manual_seed(seed)
    head = torch.randint(0, 250, (6,), generator=g)
    lays = []
    for i in range(n_samples):
        n = int(torch.randint(14, 34, (1,), generator=g))
        ids = torch.cat([head, torch.randint(0, 250, (n - 6,), generator=g)])
        lm = torch.zeros(n, dtype=torch.bool)
        lm[8:] = True
        k = int(torch.randint(1, 6, (1,), generator=g))
        lays.append(training_layout(ids, lm, sample_block_starts(lm, k, g), D, mask_id))
    b = pack(lays, row_tokens=row_tokens, share_prefix=share_prefix)
    L, T = b.n_clean, b.input_ids.shape[1]
    return b, b.columns(torch.arange(L)), b.columns(torch.arange(L, T))


def _outputs(fn, q0, k0, v0, w):
    q, k, v = (t.clone().requires_grad_(True) for t in (q0, k0, v0))
    o = fn(q, k, v)  # (B, Tq, H, d)
    (o * w).sum().backward()
    return o, q.grad, k.grad, v.grad


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("chunk,max_buckets", [(8, 6), (3, 2), (64, 1), (1, 6)])
def test_gathered_attention_equals_dense_sdpa(causal, chunk, max_buckets):
    """Block pass and clean pass of packed rows (several samples per row, a shared prefix, padding): the
    real queries' outputs and the gradients of q, k and v equal sdpa's under the dense mask of the rule,
    with grouped-query heads, at several chunk sizes and bucket counts; padding queries get zeros."""
    b, clean, blocks = _packed()
    assert b.input_ids.shape[0] >= 2 and int((b.info.seq == -1).sum()) > 0  # several rows, and padding
    H, Hkv, d = 6, 2, 8
    g = torch.Generator().manual_seed(1)
    for q_info, k_info in ((blocks.info, TokenInfo.cat([clean.info, blocks.info])), (clean.info, clean.info)):
        B, Tq, Tk = q_info.pos.shape[0], q_info.pos.shape[1], k_info.pos.shape[1]
        lay = gathered(q_info, k_info, causal, chunk=chunk, max_buckets=max_buckets)
        assert len(lay.buckets) <= max_buckets and all(bk.width % 16 == 0 for bk in lay.buckets)
        dense = additive(allowed(q_info, k_info, causal), torch.float32)
        q0, k0, v0 = (torch.randn(B, h, n, d, generator=g) for h, n in ((H, Tq), (Hkv, Tk), (Hkv, Tk)))
        real = (q_info.seq != -1)[:, :, None, None].float()
        w = torch.randn(B, Tq, H, d, generator=g) * real  # a loss that reads the real queries only
        ref = _outputs(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense, scale=0.3,
                                                                      enable_gqa=True).transpose(1, 2), q0, k0, v0, w)
        got = _outputs(lambda q, k, v: gathered_attention(q, k, v, lay, 0.3), q0, k0, v0, w)
        assert torch.allclose(ref[0] * real, got[0], atol=1e-5)  # padding queries: exactly zero
        for a, c in zip(ref[1:], got[1:]):
            assert torch.allclose(a, c, atol=1e-5)


def test_gathered_layout_computes_fewer_scores_and_only_its_own_samples():
    """Each chunk holds queries of one row and one sample, and its keys are exactly the keys some query of
    it sees (then masked padding); the layout computes far fewer scores than the dense rows."""
    b, clean, blocks = _packed(n_samples=8, row_tokens=120)
    k_info = TokenInfo.cat([clean.info, blocks.info])
    lay = gathered(blocks.info, k_info, chunk=8)
    B, Tq, Tk = lay.shape
    ok = allowed(blocks.info, k_info)  # (B, Tq, Tk)
    for bk in lay.buckets:
        q_idx, k_idx = bk.q_idx.view(bk.n, 8), bk.k_idx.view(bk.n, bk.width)
        for c in range(bk.n):
            rows, cols = q_idx[c] // Tq, q_idx[c] % Tq
            assert len(set(rows.tolist())) == 1 and len(set(blocks.info.seq[rows, cols].tolist())) == 1
            union = ok[rows[0], cols].any(0)
            n_seen = int(union.sum())
            assert bool((k_idx[c, :n_seen] // Tk == rows[0]).all())
            assert torch.equal(k_idx[c, :n_seen] % Tk, torch.nonzero(union).flatten())
            assert not bk.seen[c, :, n_seen:].any()
    real = int((blocks.info.seq != -1).sum())
    assert lay.scores() < 0.6 * B * Tq * Tk and lay.scores() >= int(ok.sum())
    assert real < B * Tq  # padding queries are left out
    assert sorted(lay.out_idx[(blocks.info.seq != -1).flatten()].tolist()) == sorted(set(
        lay.out_idx[(blocks.info.seq != -1).flatten()].tolist()))


def test_bucket_widths_merge_into_the_cheapest_groups():
    """Key counts rounded up to the alignment; at most max_buckets widths, chosen to compute the fewest
    scores (by hand, 10 chunks at 16, 1 at 32, 10 at 48 and 1 at 64 in two groups: widths 16 and 64 cost
    10 * 16 + 12 * 64 = 928, the best; 32 and 64 cost 11 * 32 + 11 * 64 = 1056; 48 and 64 cost
    21 * 48 + 64 = 1072)."""
    counts = [5] * 10 + [20] + [40] * 10 + [60]
    assert _bucket_widths(counts, 16, 6) == [16, 32, 48, 64]
    assert _bucket_widths(counts, 16, 2) == [16, 64]
    assert _bucket_widths(counts, 16, 1) == [64]
    assert _bucket_widths([0, 1], 8, 3) == [8]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_two_pass_with_gathered_attention_equals_dense(arch):
    """A model set up with gathered attention: the two-pass loss of packed rows (several rows and samples,
    padding, a shared prefix), with hard labels and with soft targets, equals the dense reference (loss,
    metrics, gradients); decoding on the same model is unchanged."""
    s, ad = adapted(arch)
    g = torch.Generator().manual_seed(3)
    head = torch.randint(0, 250, (9,), generator=g)
    lays = []
    for n, k in ((21, 5), (14, 2), (30, 7), (26, 4), (18, 3)):
        ids = torch.cat([head, torch.randint(0, 250, (n - 9,), generator=g)])
        lm = torch.zeros(n, dtype=torch.bool)
        lm[10:] = True
        lays.append(training_layout(ids, lm, sample_block_starts(lm, k, g), 4, s.config.mask_token_id))
    dec = Decoder(s, GenerationConfig(mode="speculative", max_new_tokens=12, block_size=4))
    with torch.no_grad():
        out_ref = dec.generate([5, 17, 33, 8]).tokens

    run = functools.partial(loss_and_grads, s, ad)

    batches = [pack(lays, row_tokens=60, share_prefix=True), pack(lays, row_tokens=None), pack(lays[:1])]
    assert batches[0].input_ids.shape[0] >= 2
    refs = [run(dense_loss, b) for b in batches]
    soft_ref = run(two_pass_loss, batches[0], distill=0.5)
    use_gathered_attention(s.model)
    assert s.model.config._attn_implementation == GATHER_ATTENTION
    checks = [(run(two_pass_loss, b, gather_chunk=c), r) for b, r in zip(batches, refs) for c in (8, 64)]
    checks.append((run(two_pass_loss, batches[0], distill=0.5, gather_chunk=8), soft_ref))
    for (o, go), (r, gr) in checks:
        assert torch.allclose(r.loss, o.loss, atol=1e-5)
        assert torch.equal(r.slot_correct, o.slot_correct) and torch.equal(r.slot_count, o.slot_count)
        for x, y in zip(gr, go):
            assert (x - y).abs().max() <= 1e-4 * x.abs().max()
    with torch.no_grad():
        assert dec.generate([5, 17, 33, 8]).tokens == out_ref


def test_gathered_attention_under_bf16_autocast():
    """Under bf16 autocast, with float32 queries and keys and bf16 values (as rotary embeddings leave them),
    gathered attention computes in bf16 as sdpa does there: output in bf16, gradients in the inputs' dtypes,
    all within bf16 rounding of sdpa's under the dense mask."""
    b, clean, blocks = _packed(seed=4)
    H, Hkv, d = 4, 2, 16
    q_info, k_info = blocks.info, TokenInfo.cat([clean.info, blocks.info])
    B, Tq, Tk = q_info.pos.shape[0], q_info.pos.shape[1], k_info.pos.shape[1]
    lay = gathered(q_info, k_info, chunk=8)
    dense = additive(allowed(q_info, k_info), torch.bfloat16)
    g = torch.Generator().manual_seed(5)
    q0, k0 = torch.randn(B, H, Tq, d, generator=g), torch.randn(B, Hkv, Tk, d, generator=g)
    v0 = torch.randn(B, Hkv, Tk, d, generator=g).bfloat16()
    real = (q_info.seq != -1)[:, :, None, None].float()
    w = torch.randn(B, Tq, H, d, generator=g) * real
    outs = []
    for fn in (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense, scale=0.25,
                                                              enable_gqa=True).transpose(1, 2),
               lambda q, k, v: gathered_attention(q, k, v, lay, 0.25)):
        q, k, v = (t.clone().requires_grad_(True) for t in (q0, k0, v0))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            o = fn(q, k, v)
        (o.float() * w).sum().backward()
        assert o.dtype == torch.bfloat16 and q.grad.dtype == k.grad.dtype == torch.float32
        assert v.grad.dtype == torch.bfloat16
        outs.append((o.float() * real, q.grad, k.grad, v.grad.float()))
    for a, c in zip(*outs):
        assert (a - c).norm() <= 2e-2 * c.norm()


def test_gathered_clean_pass_stops_after_the_last_layers_keys_and_values():
    """With gathered attention and hard labels the clean pass is run for its KV cache only, as with block
    attention: it stops once the last layer's keys and values are cached (that layer's MLP runs in the
    block pass alone), with the loss of the whole clean pass."""
    import sdlm.train.loss as loss_mod
    from sdlm.train.trainer import decoder_layers

    s, ad = adapted("llama")
    b, _, _ = _packed(seed=6, mask_id=s.config.mask_token_id)
    use_gathered_attention(s.model)
    layers = decoder_layers(s.model)
    calls = [0] * len(layers)
    for i, layer in enumerate(layers):
        layer.mlp.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
    stopped = two_pass_loss(s, b, 4, gather_chunk=8)
    assert calls == [2] * (len(layers) - 1) + [1]
    whole = loss_mod.fill_cache
    loss_mod.fill_cache = lambda run, layout, last: whole(run, layout, None)
    try:
        full = two_pass_loss(s, b, 4, gather_chunk=8)  # the same step with the whole clean pass run
    finally:
        loss_mod.fill_cache = whole
    assert torch.equal(stopped.loss, full.loss)
